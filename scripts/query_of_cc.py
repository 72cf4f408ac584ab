"""Query of CC on a labelled mixed-topic corpus: bootstrap queries per domain, retrieve with BM25,
write the domain corpus (JSONL + token shards + counts), and measure on-topic precision and recall
per round against a control that adds random queries of the same count.

Default: the standard-library docstrings labelled by package family (needs no data files), the
LM-free PRF expander. `--corpus kjv` uses KJV verses labelled by book (Debian bible-kjv).
`--checkpoint` (a minillm model) or `--http-url` (an OpenAI-compatible server) make the expansion
the paper's LM-driven one.

    python scripts/query_of_cc.py [--out out/query_of_cc] [--rounds 3] [--k 10] [--corpus stdlib]
"""

import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from minillm.cli import ArgumentParser
from minillm.bm25 import BM25Index
from minillm.errors import UserError, run_main
from minillm.methods.query_of_cc import (Config, LMExpander, PRFExpander, bootstrap, kjv_verses,
                                         precision_recall, random_queries, retrieve, stdlib_families,
                                         write_corpus)
from minillm.hf import load_any_tokenizer
from minillm.tokenizer import train_bpe

SEEDS = {
    "stdlib": {
        "email": ["parse an email message with MIME attachments", "send mail through an SMTP server",
                  "read messages from a mailbox folder"],
        "web": ["send an HTTP request and read the response headers", "parse a URL and quote its query",
                "parse XML elements and attributes"],
        "concurrency": ["run coroutines concurrently in an event loop", "start a pool of worker processes",
                        "acquire a lock shared between threads"],
        "numbers": ["decimal arithmetic with rounding and precision", "mean and standard deviation of data",
                    "random numbers from a distribution"],
        "files": ["copy a directory tree and remove files", "create a zip or tar archive",
                  "path of a temporary directory on the file system"],
        "text": ["match a regular expression pattern in a string", "wrap text into lines of fixed width",
                 "compare two sequences and show the differences"],
    },
    "kjv": {  # domain = one book
        "Psa": ["praise the LORD with singing", "the LORD is my shepherd", "deliver me from mine enemies"],
        "Prv": ["a wise son heareth instruction", "the fear of the LORD is wisdom", "the sluggard and the ant"],
        "Mat": ["Jesus taught the disciples in a parable", "the kingdom of heaven is like",
                "the Pharisees asked him"],
        "Rev": ["the angel sounded the trumpet", "the beast and the seven heads", "the throne and the lamb"],
    },
}


def load_lm(args):
    if args.http_url:
        from minillm.backends import OpenAIClient
        return OpenAIClient(args.http_url, args.http_model)
    from minillm.generate import LocalLM
    from minillm.checkpoint import load_model
    model, tokenizer, _ = load_model(args.checkpoint)
    if tokenizer is None:
        raise UserError(f"{args.checkpoint} carries no tokenizer")
    return LocalLM(model, tokenizer, truncate_left=True)


def evaluate(index, labels, seeds, result, config, rng):
    """Rows (domain, round, method, documents, precision, recall) at equal budgets."""
    rows = []
    for domain in seeds:
        size = sum(1 for x in labels if x == domain)
        control_queries = list(seeds[domain])
        control = list(result.retrieved[domain][0])
        for r in range(len(result.retrieved[domain])):
            if r > 0:
                n_new = sum(len(lg.new_queries) for lg in result.rounds if lg.round == r and lg.domain == domain)
                new = random_queries(index, n_new, 3, rng)
                control_queries += new
                control = list(dict.fromkeys(control + retrieve(index, new, config.k)))
            boot = result.cumulative(domain, r)
            budget = min(len(boot), len(control))  # the same number of documents for both
            for method, docs in (("bootstrap", boot), ("random control", control)):
                p, rec = precision_recall(set(docs[:budget]), labels, domain, size)
                rows.append((domain, r, method, budget, p, rec, size / len(labels)))
    return rows


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="out/query_of_cc")
    p.add_argument("--corpus", choices=["stdlib", "kjv"], default="stdlib")
    p.add_argument("--max-docs", type=int, default=None, help="first N documents only (tiny runs)")
    p.add_argument("--checkpoint", help="a minillm model as the LM (question extension, thoughts)")
    p.add_argument("--http-url", help="an OpenAI-compatible server as the LM")
    p.add_argument("--http-model", default="default")
    p.add_argument("--tokenizer", help="tokenizer file for the shards (default: BPE of 512 trained on the output)")
    for f in fields(Config):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    config = Config(**{f.name: getattr(args, f.name) for f in fields(Config)})
    if config.rounds < 0 or config.k < 1 or config.samples_per_round < 1:
        raise UserError("--rounds must be >= 0, --k and --samples-per-round >= 1")
    t0 = time.time()
    docs, labels = stdlib_families() if args.corpus == "stdlib" else kjv_verses()
    seeds = SEEDS[args.corpus]
    if args.max_docs is not None:
        first = {d: labels.index(d) for d in seeds if d in labels}  # documents come domain by domain
        enough = max(first.values()) + 1
        if args.max_docs < enough:
            missing = sorted(d for d, i in first.items() if i >= args.max_docs)
            raise UserError(f"--max-docs {args.max_docs} leaves no document of the domain(s) "
                            f"{', '.join(missing)}; pass at least {enough} for the {args.corpus} "
                            "corpus")
        docs, labels = docs[:args.max_docs], labels[:args.max_docs]
    index = BM25Index.build(docs)
    expander = (LMExpander(load_lm(args), config.max_new_tokens) if args.checkpoint or args.http_url
                else PRFExpander(index, docs, config.prf_docs, config.prf_terms))
    result = bootstrap(index, seeds, expander, config)
    rows = evaluate(index, labels, seeds, result, config, np.random.default_rng(config.seed + 1))
    kept = [" ".join(q for q in result.pools[d]) for d in seeds]
    tokenizer = (load_any_tokenizer(args.tokenizer) if args.tokenizer
                 else train_bpe([docs[i] for d in seeds for i in result.cumulative(d, config.rounds)] or kept, 512))
    counts = write_corpus(args.out, docs, result, tokenizer, labels, config.dedup_threshold)
    with open(Path(args.out) / "queries.json", "w") as f:
        json.dump(result.pools, f, indent=1)
    with open(Path(args.out) / "evaluation.json", "w") as f:
        json.dump([dict(zip(("domain", "round", "method", "documents", "precision", "recall", "chance"), r))
                   for r in rows], f, indent=1)
    print(f"{len(docs):,} documents, {len(seeds)} domains, {config.rounds} rounds, k={config.k}, "
          f"{type(expander).__name__}")
    print(f"{'round':>5s} {'method':15s} {'documents':>9s} {'precision':>9s} {'recall':>7s} {'chance':>7s}")
    for r in range(config.rounds + 1):
        for method in ("bootstrap", "random control"):
            sel = [x for x in rows if x[1] == r and x[2] == method]
            print(f"{r:5d} {method:15s} {sum(x[3] for x in sel):9d} {np.mean([x[4] for x in sel]):9.3f} "
                  f"{np.mean([x[5] for x in sel]):7.3f} {np.mean([x[6] for x in sel]):7.3f}")
    print(f"corpus: {counts['retrieved']} retrieved, {counts['after_dedup']} after MinHash dedup, "
          f"{counts.get('tokens', 0):,} tokens -> {args.out} ({time.time() - t0:.0f} s)")
    return rows, counts, result


if __name__ == "__main__":
    run_main(main)
