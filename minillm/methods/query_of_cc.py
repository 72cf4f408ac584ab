"""Query of CC (Fei et al. 2024, "Query of CC: Unearthing Large Scale Domain-Specific Knowledge from
Public Corpora"): grow a pool of queries per domain from a little seed information, retrieve each
query's top documents from a large corpus with BM25, and keep the deduplicated union as that
domain's corpus (the paper's Knowledge Pile).

One round, per domain:
  1. question extension (breadth): the LM writes new questions from questions sampled from the pool;
  2. thought generation (depth): the LM answers / reasons about sampled questions; each thought
     becomes a further query;
  3. near-duplicate filtering: a new query whose word-set Jaccard with a pool query (or an earlier
     new one) is >= `query_jaccard` is dropped;
  4. retrieval: the top `k` documents of every new query (`minillm.bm25`).
After the last round each domain's retrieved documents are deduplicated with the WanJuan-CC MinHash
(exact Jaccard verification of LSH candidates) and written as JSONL plus token shards.

The LM is anything with `generate(prompts, max_new_tokens=..., temperature=..., seed=...)` returning
texts (`minillm.generate.LanguageModel`): a minillm model (`LocalLM`) or an HTTP server
(`minillm.backends.OpenAIClient`). The prompts are ours. With no capable LM at hand (the offline
default) `PRFExpander` stands in: pseudo-relevance feedback, the classical LM-free expansion. For a
sampled query it retrieves the top `prf_docs` documents and forms
  - "extension": the query's words with the `prf_terms` highest-weighted new terms
    (term weight = sum over feedback documents of tf * idf), and
  - "thought": the highest-weighted terms alone (a query that drifts further from the seed, as a
    thought does),
so both paper steps keep their place in the loop and only the text generator is swapped.
"""

from __future__ import annotations

import ast
import gzip
import json
import re
import subprocess
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..bm25 import BM25Index, word_tokenize
from ..data import prepare
from ..errors import UserError
from ..minhash import MinHasher, UnionFind, band_hashes, exact_jaccard, lsh_params

# --- prompts (our own) ------------------------------------------------------------------------------

EXTENSION_PROMPT = (
    "You are collecting search queries about {domain}.\n"
    "Existing questions:\n{examples}\n"
    "Write one new question about {domain} that asks about something the questions above do not.\n"
    "Question:")
THOUGHT_PROMPT = (
    "Topic: {domain}\nQuestion: {question}\n"
    "Think step by step about what knowledge answers this question, and write it in two sentences.\n"
    "Thoughts:")


@dataclass
class Config:
    rounds: int = 3
    samples_per_round: int = 8      # pool queries sampled per round for each of extension / thought
    k: int = 10                     # documents retrieved per query
    query_jaccard: float = 0.7      # new queries at least this similar (word sets) to one kept: dropped
    prf_docs: int = 5               # PRF expander: feedback documents per query
    prf_terms: int = 4              # PRF expander: new terms per query
    max_new_tokens: int = 64        # LM expander: generation length
    dedup_threshold: float = 0.8    # MinHash near-duplicate threshold on the output documents
    seed: int = 0


# --- expanders --------------------------------------------------------------------------------------

class LMExpander:
    """Question extension and thought generation through a `LanguageModel`'s `generate`."""

    def __init__(self, lm, max_new_tokens: int = 64):
        self.lm, self.max_new_tokens = lm, max_new_tokens

    def extend(self, domain: str, sampled: list[list[str]], seed: int) -> list[str]:
        """One new question per group of sampled questions."""
        prompts = [EXTENSION_PROMPT.format(domain=domain, examples="\n".join(f"- {q}" for q in group))
                   for group in sampled]
        outs = self.lm.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.8,
                                seed=seed, stop=["\n"])
        return [str(o).strip() for o in outs]

    def think(self, domain: str, questions: list[str], seed: int) -> list[str]:
        prompts = [THOUGHT_PROMPT.format(domain=domain, question=q) for q in questions]
        outs = self.lm.generate(prompts, max_new_tokens=self.max_new_tokens, temperature=0.8,
                                seed=seed, stop=["\n\n"])
        return [str(o).strip() for o in outs]


class PRFExpander:
    """The LM-free stand-in (pseudo-relevance feedback over `index`); see the module docstring."""

    def __init__(self, index: BM25Index, documents: Sequence[str], prf_docs: int = 5, prf_terms: int = 4):
        self.index, self.documents = index, documents
        self.prf_docs, self.prf_terms = prf_docs, prf_terms
        df = np.diff(np.asarray(index.indptr))
        self.idf = np.log((index.num_docs + 1) / (df + 1))

    def _feedback_terms(self, query: str, exclude: set[str]) -> list[str]:
        docs, _ = self.index.search(query, self.prf_docs)
        weight: dict[int, float] = {}
        for d in docs.tolist():
            for t in self.index.query_terms(self.documents[d]):
                weight[t] = weight.get(t, 0.0) + float(self.idf[t])
        ranked = sorted(weight.items(), key=lambda x: (-x[1], x[0]))
        out = [self.index.vocab[t] for t, _ in ranked if self.index.vocab[t] not in exclude]
        return out[:self.prf_terms]

    def extend(self, domain: str, sampled: list[list[str]], seed: int) -> list[str]:
        out = []
        for group in sampled:
            q = group[0]
            words = word_tokenize(q)
            out.append(" ".join(words + self._feedback_terms(q, set(words))))
        return out

    def think(self, domain: str, questions: list[str], seed: int) -> list[str]:
        return [" ".join(self._feedback_terms(q, set(word_tokenize(q)))) for q in questions]


# --- the loop ---------------------------------------------------------------------------------------

def _word_set(text: str) -> frozenset:
    return frozenset(word_tokenize(text))


def filter_near_duplicates(candidates: Iterable[str], pool: Sequence[str], threshold: float) -> list[str]:
    """Candidates kept in order: non-empty, and below `threshold` word-set Jaccard with every pool
    query and every candidate kept before."""
    kept_sets = [_word_set(q) for q in pool]
    kept = []
    for c in candidates:
        s = _word_set(c)
        if not s or any(len(s & t) / len(s | t) >= threshold for t in kept_sets):
            continue
        kept.append(c)
        kept_sets.append(s)
    return kept


@dataclass
class RoundLog:
    round: int
    domain: str
    new_queries: list[str]
    retrieved: list[int]            # documents retrieved by this round's queries (distinct)


@dataclass
class Result:
    pools: dict[str, list[str]]                     # every query kept, seeds first
    retrieved: dict[str, list[list[int]]]           # per domain, per round (0 = seeds): documents
    rounds: list[RoundLog] = field(default_factory=list)

    def cumulative(self, domain: str, upto_round: int) -> list[int]:
        """Documents retrieved up to and including `upto_round`, first retrieval order."""
        return list(dict.fromkeys(d for r in self.retrieved[domain][:upto_round + 1] for d in r))


def retrieve(index: BM25Index, queries: Sequence[str], k: int) -> list[int]:
    """Distinct documents of the top `k` of each query, in query then rank order."""
    return list(dict.fromkeys(d for ids, _ in index.search_batch(queries, k) for d in ids.tolist()))


def bootstrap(index: BM25Index, seeds: dict[str, list[str]], expander, config: Config) -> Result:
    """Run `config.rounds` rounds of query bootstrapping from `seeds` (domain -> seed questions)."""
    if not seeds or any(not qs for qs in seeds.values()):
        raise UserError("every domain needs at least one seed query")
    rng = np.random.default_rng(config.seed)
    pools = {d: list(qs) for d, qs in seeds.items()}
    result = Result(pools, {d: [retrieve(index, qs, config.k)] for d, qs in seeds.items()})
    for r in range(1, config.rounds + 1):
        for domain, pool in pools.items():
            n = config.samples_per_round
            picks = [pool[i] for i in rng.integers(0, len(pool), n)]
            groups = [[pool[i] for i in rng.permutation(len(pool))[:3]] for _ in range(n)]
            seed = config.seed * 1000 + r
            candidates = expander.extend(domain, groups, seed) + expander.think(domain, picks, seed)
            new = filter_near_duplicates(candidates, pool, config.query_jaccard)
            pool.extend(new)
            got = retrieve(index, new, config.k)
            result.retrieved[domain].append(got)
            result.rounds.append(RoundLog(r, domain, new, got))
    return result


def dedup(texts: Sequence[str], threshold: float = 0.8, num_perm: int = 128) -> list[int]:
    """Indices of the texts kept: one per group of near-duplicates (MinHash LSH candidates whose
    exact word 5-gram Jaccard is >= threshold), the earliest."""
    if not texts:
        return []
    hasher = MinHasher(num_perm=num_perm)
    bands, rows = lsh_params(num_perm, threshold)
    buckets: dict[tuple[int, int], int] = {}
    uf = UnionFind()
    for i, row in enumerate(band_hashes(hasher.signatures(list(texts)), bands, rows).tolist()):
        for band, h in enumerate(row):
            j = buckets.setdefault((band, h), i)
            if j != i and uf.find(i) != uf.find(j) and exact_jaccard(texts[i], texts[j]) >= threshold:
                uf.union(j, i)
    return [i for i in range(len(texts)) if uf.find(i) == i]


def write_corpus(out_dir: str | Path, documents: Sequence[str], result: Result, tokenizer=None,
                 labels: Sequence[str] | None = None, dedup_threshold: float = 0.8) -> dict:
    """Write `corpus.jsonl` (one record per kept document and domain: text, domain, round first
    retrieved, corpus id; near-duplicates removed within each domain), token shards through
    `minillm.data.prepare` when a tokenizer is given, and `counts.json` (per round and per domain).
    Returns the counts."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for domain, rounds in result.retrieved.items():
        seen: set[int] = set()
        for r, docs in enumerate(rounds):
            for d in docs:
                if d not in seen:
                    records.append({"id": d, "domain": domain, "round": r, "text": documents[d]})
                    seen.add(d)
    kept = []
    for domain in result.retrieved:  # each domain's corpus is deduplicated on its own
        mine = [rec for rec in records if rec["domain"] == domain]
        kept += [mine[i] for i in dedup([rec["text"] for rec in mine], dedup_threshold)]
    with open(out_dir / "corpus.jsonl", "w") as f:
        for rec in kept:
            if labels is not None:
                rec = {**rec, "label": labels[rec["id"]]}
            f.write(json.dumps(rec) + "\n")
    counts = {"retrieved": len(records), "after_dedup": len(kept), "per_domain": {}}
    for domain, rounds in result.retrieved.items():
        counts["per_domain"][domain] = {
            "queries": len(result.pools[domain]),
            "per_round": [{"round": r, "new_documents": sum(1 for x in kept
                                                            if x["domain"] == domain and x["round"] == r)}
                          for r in range(len(rounds))]}
    if tokenizer is not None and kept:
        meta = prepare([rec["text"] for rec in kept], tokenizer, out_dir / "shards", val_fraction=0.0,
                       workers=1, progress=False)
        counts["tokens"] = meta["splits"]["train"]["tokens"]
    (out_dir / "counts.json").write_text(json.dumps(counts, indent=2))
    return counts


# --- evaluation -------------------------------------------------------------------------------------

def precision_recall(retrieved: Iterable[int], labels: Sequence[str], domain: str,
                     domain_size: int) -> tuple[float, float]:
    """On-topic precision and recall of a set of documents for `domain`."""
    retrieved = set(retrieved)
    if not retrieved:
        return 0.0, 0.0
    hits = sum(1 for d in retrieved if labels[d] == domain)
    return hits / len(retrieved), hits / domain_size


def random_queries(index: BM25Index, n: int, words: int, rng: np.random.Generator) -> list[str]:
    """The control: `n` queries of `words` terms drawn uniformly from the index vocabulary."""
    vocab = index.vocab
    return [" ".join(vocab[i] for i in rng.integers(0, len(vocab), words)) for _ in range(n)]


# --- labelled local corpora -------------------------------------------------------------------------

STDLIB_FAMILIES = {  # package family -> top-level standard-library modules (the default corpus)
    "email": ["email", "smtplib", "imaplib", "poplib", "mailbox", "mimetypes"],
    "web": ["http", "urllib", "html", "xml", "wsgiref", "xmlrpc", "cgi", "webbrowser"],
    "concurrency": ["asyncio", "concurrent", "multiprocessing", "threading", "queue", "sched", "selectors"],
    "numbers": ["decimal", "fractions", "statistics", "random", "numbers", "math"],
    "files": ["os", "pathlib", "shutil", "zipfile", "tarfile", "glob", "tempfile", "filecmp", "io"],
    "text": ["re", "string", "textwrap", "difflib", "unicodedata", "codecs", "encodings"],
}


def stdlib_families() -> tuple[list[str], list[str]]:
    """(docstrings, family labels) of the standard-library modules in `STDLIB_FAMILIES`, plus the
    rest of the standard library labelled "other" (the distractors). Needs no data files."""
    root = Path(sysconfig.get_paths()["stdlib"])
    family_of = {m: f for f, ms in STDLIB_FAMILIES.items() for m in ms}
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__",
            "ensurepip", "pydoc_data"}
    texts, labels = [], []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if skip.intersection(parts[:-1]):
            continue
        top = parts[0][:-3] if len(parts) == 1 else parts[0]
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    texts.append(doc)
                    labels.append(family_of.get(top, "other"))
    if not texts:
        raise UserError(f"no standard-library sources under {root}")
    return texts, labels


def kjv_verses() -> tuple[list[str], list[str]]:
    """(verses, book abbreviations) from the Debian `bible-kjv` program (31,102 verses). Optional corpus."""
    try:
        out = subprocess.run(["bible", "-f", "gen1:1-rev22:21"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise UserError(f"the KJV needs the Debian packages bible-kjv and bible-kjv-text ({e})") from None
    verses, books = [], []
    for line in out.splitlines():  # "Ge1:1 In the beginning ..."
        m = re.match(r"^(\d?[A-Za-z]+)\d+:\d+ (.*)$", line)
        if m:
            books.append(m.group(1))
            verses.append(m.group(2))
    return verses, books


def _b64(s: str) -> int:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    n = 0
    for ch in s:
        n = n * 64 + alphabet.index(ch)
    return n


def gcide_entries(folder: str = "/usr/share/dictd") -> list[str]:
    """The entries of the Debian `dict-gcide` dictionary (one document per distinct index span,
    the database's own 00-* records left out). Optional corpus."""
    folder_ = Path(folder)
    try:
        data = gzip.decompress((folder_ / "gcide.dict.dz").read_bytes())
        index = (folder_ / "gcide.index").read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"GCIDE needs the Debian package dict-gcide ({e})") from None
    spans = []
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not parts[0].startswith("00-"):
            spans.append((_b64(parts[1]), _b64(parts[2])))
    return [data[o:o + n].decode("utf-8", "replace") for o, n in sorted(set(spans))]


__all__ = ["Config", "LMExpander", "PRFExpander", "Result", "bootstrap", "dedup",
           "filter_near_duplicates", "gcide_entries", "kjv_verses", "precision_recall",
           "random_queries", "stdlib_families", "write_corpus"]
