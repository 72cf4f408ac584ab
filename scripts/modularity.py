"""Emergent modularity at small scale: are there functional experts in a tiny ReLU LM trained on
text with planted functions, does perturbing them hurt their own function most, and when does the
expert structure settle compared with single neurons? (minillm/methods/modularity.py; Zhang et al. 2023)

    python scripts/modularity.py                  # trains the tiny LM, then the tables
    python scripts/modularity.py --tiny true      # seconds: a smoke run
    python scripts/modularity.py --hf path/to/gpt2           # a pretrained GPT-2 folder, planted probes
    python scripts/modularity.py --hf path/to/gpt2 --probing probes.jsonl
    python scripts/modularity.py --checkpoint out/run/ckpt_0000800.pt --probing probes.jsonl
    python scripts/modularity.py --run-dir out/run --probing probes.jsonl   # emergence over ckpt_*.pt

By default four binary functions are planted in a corpus of standard-library docstrings: animal
size ("the whale is a big animal"), digit parity ("the number seven is odd"), review mood
("review: lovely bright warm, verdict good") and fruit colour ("the lemon looks yellow"). Each
probing set holds fresh prompts of one function with their labels, the answer word after the
prompt; the same sets probe any model (`--hf`: a Hugging Face GPT-2-family folder with
config.json, its weights and tokenizer.json, as `save_pretrained` writes it). A probing file
(`--probing`, JSON lines) gives other functions:
{"function": "size", "text": "the whale is a", "label": 1, "answer": " big"}; without "answer"
the perturbation tables are skipped.

Prints: (0) the model's answer loss per function (did it learn them?) and how alike the W_in rows
of each function's top neurons are; (1) functional experts (MoEfication clusters, or a native
MoE's experts) beside random partitions of the same sizes; (2) perturbation damage (loss increase
on the answers) of functional experts vs. the same number of top-predictivity neurons vs. random
neurons, on the function they belong to and on the others, in the last third of the layers:
(2a) the official shuffle over examples, positions and neurons times --var 4, (2b) a permutation
of each neuron over examples; (3) emergence: Spearman of neuron- and expert-level predictivity
between adjacent checkpoints, per function and their mean (final clusters for all, as the
official code; per-checkpoint clusters matched; random partitions).
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from minillm import distributed
from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.errors import UserError, run_main
from minillm.hf import load_hf, load_hf_tokenizer, load_any_tokenizer
from minillm.model import ModelSize, preset
from minillm.checkpoint import load_model
from minillm.methods.modularity import (ProbingSet, collect_activations, emergence,
                                        expert_units, find_functional_experts, function_loss,
                                        modularity_summary, moefication_partitions,
                                        perturbation_layers, predictivity, random_baseline,
                                        random_units, rank_neurons, separation, top_units)
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer


@dataclass
class ModularityConfig(ModelSize):
    out_dir: str = field(default="out/modularity", metadata={"help": "data, checkpoints, results"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "analyse this minillm model / training checkpoint instead of training one"})
    hf: str | None = field(default=None, metadata={
        "help": "analyse this Hugging Face model folder (ReLU / GELU GPT-2 family)"})
    run_dir: str | None = field(default=None, metadata={
        "help": "emergence over the ckpt_*.pt of this run (default: the run trained here)"})
    probing: str | None = field(default=None, metadata={
        "help": "probing sets as JSON lines {function, text, label[, answer]} (default: planted)"})
    steps: int = 2000
    ckpt_interval: int = 200
    n_embd: int = 128  # ModelSize's other sizes: 2 layers, 4 heads, 64 tokens
    batch_size: int = 32
    lr: float = 3e-3
    init_std: float = field(default=0.02, metadata={
        "help": "weight init std; smaller lets learned directions dominate W_in rows sooner"})
    sentences: int = 20000
    background: float = field(default=1.0, metadata={
        "help": "standard-library docstrings per paragraph of 8 planted sentences"})
    examples: int = field(default=256, metadata={"help": "probing examples per planted function"})
    experts: int = field(default=16, metadata={"help": "MoEfication experts per layer"})
    share: float = field(default=0.1, metadata={"help": "top share of neurons per sub-function"})
    alpha: float = field(default=1e-3, metadata={"help": "hypergeometric test level"})
    k: int = field(default=1, metadata={"help": "functional experts per layer perturbed"})
    perturbation: str = field(default="both", metadata={
        "help": "shuffle (official: over examples, positions and neurons, times --var), permute "
                "(each neuron over examples), or both"})
    var: float = field(default=4.0, metadata={"help": "shuffle perturbation's scale (official: 4)"})
    perturb_layers: str = field(default="last-third", metadata={
        "help": "layers perturbed: last-third (official) or all"})
    random_repeats: int = 20
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})
    threads: int = field(default=1, metadata={
        "help": "torch CPU threads (the tiny model gains little from more); 0: torch's default"})
    seed: int = 0


# --- planted functions ------------------------------------------------------------------------------

WORDS = {
    "size": (["elephant", "whale", "horse", "bear", "camel", "tiger", "moose", "bison"],
             ["mouse", "ant", "bee", "frog", "wren", "flea", "snail", "moth"]),
    "parity": (["one", "three", "five", "seven", "nine", "eleven", "thirteen", "fifteen"],
               ["two", "four", "six", "eight", "ten", "twelve", "fourteen", "sixteen"]),
    "mood": (["lovely", "bright", "warm", "kind", "sweet", "happy", "gentle", "fine"],
             ["awful", "dull", "cold", "rude", "sour", "sad", "harsh", "grim"]),
    "colour": (["lemon", "banana", "corn", "butter", "canary", "mustard", "honey", "daffodil"],
               ["cherry", "tomato", "ruby", "strawberry", "radish", "brick", "cranberry", "poppy"]),
}
ANSWERS = {"size": (" big", " small"), "parity": (" odd", " even"), "mood": (" good", " bad"),
           "colour": (" yellow", " red")}


def planted(function: str, label: int, rng) -> tuple[str, str, str]:
    """(prompt, answer, rest of the sentence) of one planted example; label 1 is the first list."""
    words = WORDS[function][1 - label]
    answer = ANSWERS[function][1 - label]
    if function == "size":
        return f"the {rng.choice(words)} is a", answer, " animal."
    if function == "parity":
        return f"the number {rng.choice(words)} is", answer, "."
    if function == "mood":
        return f"review: {' '.join(rng.choice(words, 3))}, verdict", answer, "."
    return f"the {rng.choice(words)} looks", answer, "."


def corpus(n_sentences: int, max_docstring_files: int | None, seed: int,
           background: float = 1.0) -> list[str]:
    """Documents: paragraphs of 8 planted sentences, interleaved with standard-library docstrings
    (`background` of them per paragraph)."""
    rng = np.random.default_rng(seed)
    functions = list(WORDS)
    sentences = []
    for _ in range(n_sentences):
        prompt, answer, rest = planted(functions[rng.integers(len(functions))], int(rng.integers(2)), rng)
        sentences.append(prompt + answer + rest)
    paragraphs = [" ".join(sentences[i:i + 8]) for i in range(0, len(sentences), 8)]
    docstrings = list(stdlib_docstrings(max_files=max_docstring_files))
    docs, used = [], 0
    for i, p in enumerate(paragraphs):
        docs.append(p)
        want = int((i + 1) * background)
        docs += docstrings[used:want]
        used = max(used, want)
    return docs


def planted_probes(tok, n: int, seed: int) -> list[ProbingSet]:
    """One probing set per planted function, fresh examples, balanced labels."""
    rng = np.random.default_rng(seed + 1000)
    probes = []
    for function in WORDS:
        tokens, labels, starts = [], [], []
        for i in range(n):
            prompt, answer, _ = planted(function, i % 2, rng)
            p, a = tok.encode_ordinary(prompt), tok.encode_ordinary(answer)
            tokens.append(p + a)
            labels.append(i % 2)
            starts.append(len(p))
        probes.append(ProbingSet(function, tokens, np.array(labels), starts))
    return probes


def file_probes(path: str, tok) -> list[ProbingSet]:
    """Probing sets from JSON lines {function, text, label[, answer]}."""
    groups: dict[str, list[dict]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            groups.setdefault(row["function"], []).append(
                {"text": str(row["text"]), "label": int(row["label"]), "answer": row.get("answer")})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{path}:{n}: expected JSON with function, text, label "
                            f"(and optionally answer): {e}") from None
    probes = []
    for function, rows in groups.items():
        answered = all(r["answer"] for r in rows)
        prompts = [tok.encode_ordinary(r["text"]) for r in rows]
        answers = [tok.encode_ordinary(r["answer"]) if answered else [] for r in rows]
        probes.append(ProbingSet(function, [p + a for p, a in zip(prompts, answers)],
                                 np.array([r["label"] for r in rows]),
                                 [len(p) for p in prompts] if answered else None))
    if not probes:
        raise UserError(f"{path}: no probing examples")
    return probes


# --- analysis -----------------------------------------------------------------------------------------

def predictivities(model, probes):
    """{layer: {function: predictivity of each neuron}}, and the same for the separation that
    breaks predictivity's ties."""
    preds: dict[int, dict[str, np.ndarray]] = {}
    seps: dict[int, dict[str, np.ndarray]] = {}
    for probe in probes:
        for layer, acts in collect_activations(model, probe).items():
            preds.setdefault(layer, {})[probe.name] = predictivity(acts, probe.labels)
            seps.setdefault(layer, {})[probe.name] = separation(acts, probe.labels)
    return preds, seps


def table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "-+-".join("-" * w for w in widths)] + lines[1:])


def functional_table(preds, seps, partitions, cfg) -> tuple[str, dict]:
    ours = modularity_summary(preds, partitions, cfg.share, cfg.alpha, seps)
    rand = random_baseline(preds, partitions, cfg.share, cfg.alpha, cfg.random_repeats, cfg.seed,
                           seps)
    rows = [["clusters", ours["functional_share"], ours["extent"], ours["extent_official"],
             f"{ours['functional']}/{ours['pairs']}"],
            [f"random (mean of {cfg.random_repeats})", rand["functional_share"], rand["extent"],
             rand["extent_official"], "-"]]
    header = ["partition", "functional share", "extent", "extent (official, 0 if none)",
              "functional pairs"]
    return table(header, rows), {
        "clusters": ours, "random": rand}


def perturbation_table(model, probes, preds, seps, partitions, cfg, method: str,
                       layers: list[int]) -> tuple[str, dict]:
    """Loss increase on each function's answers when one function's chosen neurons in `layers`
    are perturbed by `method` (see `function_loss`)."""
    rng = np.random.default_rng(cfg.seed)
    probes = [p for p in probes if p.answer_start is not None]

    def loss(probe, units=None):
        return function_loss(model, probe, units, seed=cfg.seed, method=method, scale=cfg.var)

    clean = {p.name: loss(p) for p in probes}
    sizes = {l: len(next(iter(fs.values()))) for l, fs in preds.items()}
    damage = {"expert": {}, "top": {}, "random": {}}
    for target in probes:
        tests = {l: find_functional_experts(preds[l][target.name], partitions[l], cfg.share, cfg.alpha,
                                            seps[l][target.name]) for l in layers}
        chosen = {"expert": expert_units(tests, partitions, cfg.k)}
        counts = {l: len(u) for l, u in chosen["expert"].items()}
        if not sum(counts.values()):
            continue  # no functional expert for this function in these layers
        chosen["top"] = top_units({l: preds[l][target.name] for l in layers}, counts,
                                  {l: seps[l][target.name] for l in layers})
        chosen["random"] = random_units(sizes, counts, rng)
        for kind, units in chosen.items():
            damage[kind][target.name] = {p.name: loss(p, units) - clean[p.name] for p in probes}
    rows, summary = [], {}
    for kind, per_target in damage.items():
        if not per_target:
            continue
        own = float(np.mean([d[t] for t, d in per_target.items()]))
        other = float(np.mean([np.mean([v for f, v in d.items() if f != t]) for t, d in per_target.items()]))
        specific = sum(d[t] > max(v for f, v in d.items() if f != t) for t, d in per_target.items())
        rows.append([kind, own, other, f"{specific}/{len(per_target)}"])
        summary[kind] = {"own": own, "other": other, "own_is_largest": int(specific),
                         "functions": len(per_target), "by_function": per_target}
    header = ["perturbed neurons", "own function dloss", "other functions dloss", "own hurt most"]
    text = (table(header, rows) if rows else
            "(no function has a functional expert in these layers: nothing perturbed)")
    if damage["expert"]:
        names = [p.name for p in probes]
        text += "\n\nloss increase per function (rows: whose functional experts are perturbed)\n"
        text += table(["experts of"] + names, [[t] + [d[n] for n in names]
                                               for t, d in damage["expert"].items()])
    return text, {"method": method, "layers": layers, **summary}


def emergence_table(paths: list[Path], probes, cfg) -> tuple[str, list[dict]]:
    preds, parts, steps = [], [], []
    for path in paths:
        model = load_model(path)[0]
        preds.append(predictivities(model, probes)[0])
        parts.append(moefication_partitions(model, cfg.experts, cfg.seed))
        steps.append(path.stem.split("_")[-1].lstrip("0") or "0")
    rows = emergence(preds, parts, cfg.random_repeats, cfg.seed)
    for r, a, b in zip(rows, steps, steps[1:]):
        r["from"], r["to"] = int(a), int(b)
    levels = [("neuron", "neuron"), ("expert_final", "expert (final clusters)"),
              ("expert_matched", "expert (matched clusters)")]
    if cfg.random_repeats:
        levels.append(("random", "random partition"))
    text = "mean over functions and layers\n" + table(
        ["steps"] + [name for _, name in levels],
        [[f"{r['from']}->{r['to']}"] + [r[key] for key, _ in levels] for r in rows])
    shown = sorted({0, len(rows) // 2, len(rows) - 1})
    text += "\n\nper function (mean over layers), first, middle and last pairs\n" + table(
        ["function", "steps"] + [name for _, name in levels],
        [[f, f"{rows[i]['from']}->{rows[i]['to']}"] + [rows[i]["by_function"][f][key] for key, _ in levels]
         for f in rows[0]["by_function"] for i in shown])
    return text, rows


def row_cosines(model, preds, seps, cfg) -> dict[int, dict[str, float]]:
    """Per layer: the mean cosine between the W_in rows of each function's top-share neurons, and
    between all rows. Clustering W_in rows can only gather a function's neurons when the first is
    well above the second."""
    out = {}
    for layer, per_function in preds.items():
        ffn = model.blocks[layer].ffn
        if not hasattr(ffn, "up"):
            continue  # a native MoE: its experts are given, not clustered
        w = torch.nn.functional.normalize(ffn.up.weight.detach().float().cpu(), dim=-1)
        cos = w @ w.t()
        off_diagonal = ~torch.eye(len(w), dtype=torch.bool)
        top = []
        for f, pred in per_function.items():
            idx = torch.as_tensor(rank_neurons(pred, seps[layer][f])[:max(2, round(cfg.share * len(pred)))])
            sub = cos[idx][:, idx]
            top.append(float(sub[~torch.eye(len(idx), dtype=torch.bool)].mean()))
        out[layer] = {"top": float(np.mean(top)), "all": float(cos[off_diagonal].mean())}
    return out


def strict(value):
    """`value` with numpy numbers as Python ones and non-finite floats as None (strict JSON)."""
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


# --- main -----------------------------------------------------------------------------------------------

def train_planted(cfg: ModularityConfig, out: Path):
    """Prepare the planted corpus and train the tiny ReLU LM, keeping every checkpoint; returns
    the model, its tokenizer, the run folder and the final validation loss."""
    data = out / "data"
    if not (data / "meta.json").is_file():
        docs = corpus(cfg.sentences, 10 if cfg.tiny else None, cfg.seed, cfg.background)
        tok = train_bpe(docs[::2], vocab_size=320 if cfg.tiny else 1024)
        prepare(docs, tok, data, val_fraction=0.02, progress=False)
    train_cfg = TrainConfig(data=[str(data)], out_dir=str(out / "run"), max_steps=cfg.steps,
                            block_size=cfg.block_size, batch_size=cfg.batch_size, lr=cfg.lr,
                            warmup_steps=min(50, cfg.steps // 10), eval_interval=cfg.steps,
                            ckpt_interval=cfg.ckpt_interval, keep_checkpoints=0,
                            log_interval=max(cfg.steps // 6, 1), seed=cfg.seed, overwrite=True,
                            progress=False)
    dist = distributed.setup("auto")
    vocab_size = load_any_tokenizer(data / "tokenizer.json").vocab_size
    model_cfg = preset("tiny-gpt", vocab_size=vocab_size, activation="relu", init_std=cfg.init_std,
                       **cfg.sizes())
    trainer = Trainer(train_cfg, dist, model_config=model_cfg)
    trainer.train()
    metrics = (out / "run" / "metrics.jsonl").read_text().splitlines()
    val_loss = [r["val_loss"] for r in map(json.loads, metrics) if "val_loss" in r][-1]
    return trainer.model, trainer.tokenizer, out / "run", val_loss


PERTURBATION_CHOICES = ("shuffle", "permute", "both")
LAYER_CHOICES = ("last-third", "all")


def main(argv=None) -> dict:
    cfg = parse_config(ModularityConfig, argv, description=__doc__)
    if cfg.tiny:
        cfg.steps, cfg.ckpt_interval, cfg.sentences, cfg.examples = 30, 10, 800, 32
        cfg.n_embd, cfg.experts, cfg.random_repeats, cfg.block_size = 32, 4, 5, 32
    if cfg.checkpoint and cfg.hf:
        raise UserError("pass one of --checkpoint and --hf")
    if cfg.perturbation not in PERTURBATION_CHOICES:
        raise UserError(f"--perturbation {cfg.perturbation!r}: expected one of "
                        f"{', '.join(PERTURBATION_CHOICES)}")
    if cfg.perturb_layers not in LAYER_CHOICES:
        raise UserError(f"--perturb-layers {cfg.perturb_layers!r}: expected one of "
                        f"{', '.join(LAYER_CHOICES)}")
    if cfg.threads < 0:
        raise UserError(f"--threads {cfg.threads}: expected 0 (torch's default) or more")
    if not cfg.var > 0:
        raise UserError(f"--var {cfg.var}: the shuffle's scale must be positive")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run_dir = Path(cfg.run_dir) if cfg.run_dir else None
    results = {"config": vars(cfg)}
    if cfg.hf:
        model, tok = load_hf(cfg.hf).float(), load_hf_tokenizer(cfg.hf)
    elif cfg.checkpoint:
        model, tok, _ = load_model(cfg.checkpoint)
    elif run_dir is not None:
        last = sorted(run_dir.glob("ckpt_*.pt"))
        if not last:
            raise UserError(f"--run-dir {run_dir}: no ckpt_*.pt files")
        model, tok, _ = load_model(last[-1])
    else:
        model, tok, run_dir, results["val_loss"] = train_planted(cfg, out)
        print(f"trained in {time.perf_counter() - t0:.0f} s; validation loss "
              f"{results['val_loss']:.3f}")
    if tok is None:
        raise UserError(f"{cfg.checkpoint}: the checkpoint carries no tokenizer, so probing text "
                        "cannot be encoded; save the model with its tokenizer")
    model = model.cpu().eval()
    probes = (file_probes(cfg.probing, tok) if cfg.probing
              else planted_probes(tok, cfg.examples, cfg.seed))
    preds, seps = predictivities(model, probes)
    partitions = moefication_partitions(model, cfg.experts, cfg.seed)

    results["answer_loss"] = {p.name: function_loss(model, p) for p in probes if p.answer_start}
    results["row_cosine"] = row_cosines(model, preds, seps, cfg)
    print("\n(0) the model: clean answer loss per function (chance is about ln 2 = 0.69 between "
          "the two answers)\n" + table(list(results["answer_loss"]), [list(results["answer_loss"].values())]))
    print("mean W_in row cosine, each function's top neurons vs. all pairs\n" + table(
        ["layer", "top neurons", "all rows"],
        [[l, c["top"], c["all"]] for l, c in results["row_cosine"].items()]))

    text, results["functional"] = functional_table(preds, seps, partitions, cfg)
    print(f"\n(1) functional experts: top {cfg.share:.0%} of neurons per function, "
          f"hypergeometric p <= {cfg.alpha}, {len(partitions)} layer(s)\n{text}")
    n_layer = len(model.blocks)
    layers = perturbation_layers(n_layer) if cfg.perturb_layers == "last-third" else list(range(n_layer))
    methods = ["shuffle", "permute"] if cfg.perturbation == "both" else [cfg.perturbation]
    titles = {"shuffle": f"official shuffle over examples, positions and neurons, times {cfg.var:g}",
              "permute": "permutation of each neuron over examples"}
    results["perturbation"] = {}
    for tag, method in zip("ab", methods):
        text, results["perturbation"][method] = perturbation_table(
            model, probes, preds, seps, partitions, cfg, method, layers)
        print(f"\n(2{tag if len(methods) > 1 else ''}) perturbation: {titles[method]}; layer(s) "
              f"{', '.join(map(str, layers))}, k = {cfg.k} expert(s) per layer\n{text}")
    paths = sorted(run_dir.glob("ckpt_*.pt")) if run_dir is not None else []
    if len(paths) >= 2:
        text, results["emergence"] = emergence_table(paths, probes, cfg)
        print(f"\n(3) emergence: Spearman between adjacent checkpoints\n{text}")
    results["seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(strict(results), indent=1, allow_nan=False))
    print(f"\ntotal {results['seconds']:.0f} s; results in {out / 'results.json'}")
    return results


if __name__ == "__main__":
    run_main(main)
