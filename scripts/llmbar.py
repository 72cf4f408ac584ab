"""LLMBar: how well does a model judge which of two outputs follows an instruction?

    python scripts/llmbar.py                       # offline: a tiny local model on the constructed set
    python scripts/llmbar.py --checkpoint out/quickstart/model.pt --strategy vanilla rules+swap
    python scripts/llmbar.py --base-url http://127.0.0.1:8000/v1 --model NAME \\
        --data path/to/LLMBar --strategy vanilla rules+metrics+reference swap+cot

Without `--base-url` the evaluator is a local minillm model (`--checkpoint`, or, by default, a tiny
GPT trained here for `--train-steps` on the standard library's docstrings) whose verdict compares
the log-likelihoods of " Output (a)" and " Output (b)". With `--base-url` and `--model` it is any
OpenAI-compatible server (vLLM, llama.cpp's server, a hosted API; key from `--api-key-env`), whose
verdict is parsed from its generated answer. `--data` is the released LLMBar folder (the paper's
repository, `Dataset/LLMBar`); without it, the constructed offline set of `minillm.methods.llmbar`.
Prints accuracy and positional agreement per subset and strategy, beside two scripted evaluators
(always "(a)", and "the longer output"), and writes `results.json` to `--out-dir`.
"""

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minillm import distributed
from minillm.backends import OpenAIClient
from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.errors import UserError, run_main
from minillm.generate import LocalLM
from minillm.methods.llmbar import (LMEvaluator, Strategy, constructed_set, format_report,
                                    load_folder, meta_evaluate, write_folder)
from minillm.checkpoint import load_model, save_model
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer


@dataclass
class LLMBarConfig:
    data: str | None = field(default=None, metadata={
        "help": "the released LLMBar folder; default: the constructed offline set"})
    strategy: list[str] = field(default_factory=lambda: ["vanilla", "rules+swap"], metadata={
        "help": "vanilla, or parts joined by '+': rules, cot, metrics, reference, swap"})
    base_url: str | None = field(default=None, metadata={
        "help": "an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1"})
    model: str | None = field(default=None, metadata={"help": "the served model's name"})
    api: str = field(default="chat", metadata={"help": "chat or completions (with --base-url)"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the API key (if any)"})
    max_concurrency: int = 8
    timeout: float = field(default=120.0, metadata={"help": "seconds per request"})
    verdict_by: str = field(default="auto", metadata={
        "help": "score (log-likelihood of each verdict) or text (parse the answer); auto: score "
                "for a local model, text for a server"})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "per generation (CoT, metrics, reference); default 256 for a server, 32 locally"})
    checkpoint: str | None = field(default=None, metadata={
        "help": "a minillm model file; default: train a tiny GPT here"})
    train_steps: int = field(default=120, metadata={
        "help": "steps (8 x 256 tokens each) of the tiny local model"})
    limit: int | None = field(default=None, metadata={"help": "first N pairs of every subset"})
    per_family: int = field(default=6, metadata={
        "help": "constructed set: instances of each of its 8 instruction families"})
    save_constructed: str | None = field(default=None, metadata={
        "help": "also write the constructed set, in the released layout, to this folder"})
    out_dir: str = "out/llmbar"
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto, cpu or cuda"})


def check(cfg: LLMBarConfig) -> list[Strategy]:
    if (cfg.base_url is None) != (cfg.model is None):
        raise UserError("--base-url and --model go together (the server and its model's name)")
    if cfg.api not in ("chat", "completions"):
        raise UserError(f"--api {cfg.api!r}: expected chat or completions")
    if cfg.verdict_by not in ("auto", "score", "text"):
        raise UserError(f"--verdict-by {cfg.verdict_by!r}: expected auto, score or text")
    if cfg.verdict_by == "score" and cfg.base_url and cfg.api == "chat":
        raise UserError("--verdict-by score needs log-probs of the prompt, which a chat endpoint "
                        "does not return: pass --api completions or --verdict-by text")
    if cfg.checkpoint and cfg.base_url:
        raise UserError("--checkpoint (a local model) and --base-url (a server): give one")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise UserError(f"--checkpoint {cfg.checkpoint}: no such file")
    for name, value in (("--limit", cfg.limit), ("--per-family", cfg.per_family),
                        ("--train-steps", cfg.train_steps), ("--max-new-tokens", cfg.max_new_tokens),
                        ("--max-concurrency", cfg.max_concurrency)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise UserError(f"--device {cfg.device!r}: expected auto, cpu or cuda")
    return [Strategy.parse(s) for s in cfg.strategy]


def train_tiny_model(cfg: LLMBarConfig, out_dir: Path, device: str):
    """A tiny GPT on the standard library's docstrings, as scripts/quickstart.py trains one."""
    data_dir = out_dir / "data"
    if not (data_dir / "meta.json").is_file():
        docs = list(stdlib_docstrings(max_files=40 if cfg.tiny else None))
        # BPE training is pure Python: a 1,024-token vocabulary from the first 2,000 docstrings
        # keeps the default run short; the model then trains on all of them.
        print(f"training a tokenizer on {min(len(docs), 2000)} standard-library docstrings ...")
        tok = train_bpe(docs[:2000], vocab_size=512 if cfg.tiny else 1024)
        prepare(docs, tok, data_dir, val_fraction=0.02, progress=False)
    steps = 10 if cfg.tiny else cfg.train_steps
    train_cfg = TrainConfig(data=[str(data_dir)], out_dir=str(out_dir / "model"), preset="tiny-gpt",
                            block_size=64 if cfg.tiny else 256, batch_size=8, max_steps=steps,
                            warmup_steps=min(20, steps // 2), eval_interval=steps,
                            ckpt_interval=steps, log_interval=max(steps // 4, 1), seed=cfg.seed,
                            device=device, overwrite=True, progress=False)
    trainer = Trainer(train_cfg, distributed.setup("auto" if device == "auto" else device))
    trainer.train()
    save_model(out_dir / "model.pt", trainer.model, trainer.tokenizer)
    return trainer.model.eval(), trainer.tokenizer


def always_a(triples):
    return ["a"] * len(triples)


def prefer_longer(triples):
    return ["a" if len(a) > len(b) else "b" if len(b) > len(a) else None for _, a, b in triples]


def main(argv=None):
    cfg = parse_config(LLMBarConfig, argv, description=__doc__)
    strategies = check(cfg)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    if cfg.data:
        subsets, source = load_folder(cfg.data), cfg.data
    else:
        subsets = constructed_set(per_family=2 if cfg.tiny else cfg.per_family, seed=cfg.seed)
        source = "the constructed set (minillm.methods.llmbar.constructed_set)"
        if cfg.save_constructed:
            write_folder(cfg.save_constructed, subsets)
            print(f"wrote the constructed set to {cfg.save_constructed}")
    if cfg.limit:
        subsets = {name: pairs[:cfg.limit] for name, pairs in subsets.items()}
    print(f"data: {source}: " + ", ".join(f"{n} ({len(p)})" for n, p in subsets.items()))

    if cfg.base_url:
        lm = OpenAIClient(cfg.base_url, cfg.model, api=cfg.api, api_key_env=cfg.api_key_env,
                          timeout=cfg.timeout, max_concurrency=cfg.max_concurrency)
        evaluator_name = f"{cfg.model} at {cfg.base_url} ({cfg.api})"
        verdict_by, max_new = ("text" if cfg.verdict_by == "auto" else cfg.verdict_by,
                               cfg.max_new_tokens or 256)
    else:
        device = cfg.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if cfg.checkpoint:
            model, tok, _ = load_model(cfg.checkpoint, device=device)
            if tok is None:
                raise UserError(f"{cfg.checkpoint} carries no tokenizer: save it with "
                                "save_model(..., tokenizer)")
            model.eval()
            evaluator_name = cfg.checkpoint
        else:
            start = time.time()
            model, tok = train_tiny_model(cfg, out_dir, device)
            evaluator_name = (f"a tiny GPT ({model.num_params() / 1e6:.2f}M parameters) trained here "
                              f"in {time.time() - start:.0f} s, saved to {out_dir / 'model.pt'}")
        lm = LocalLM(model, tok, batch_size=8, truncate_left=True)
        verdict_by = "score" if cfg.verdict_by == "auto" else cfg.verdict_by
        max_new = cfg.max_new_tokens or (8 if cfg.tiny else 32)
    print(f"evaluator: {evaluator_name}; verdicts by {verdict_by}")

    results = {"config": asdict(cfg), "evaluator": evaluator_name, "strategies": {}}
    for name, scripted in (("scripted: always (a)", always_a),
                           ("scripted: the longer output", prefer_longer)):
        report = meta_evaluate(subsets, scripted)
        print(f"\n== {name}\n{format_report(report)}")
        results["strategies"][name] = report["subsets"]
    for strategy in strategies:
        evaluator = LMEvaluator(lm, strategy, verdict_by=verdict_by, max_new_tokens=max_new)
        start = time.time()
        report = meta_evaluate(subsets, evaluator)
        seconds = time.time() - start
        notes = [f"{seconds:.0f} s", f"{evaluator.stats['generations']} generations",
                 f"{evaluator.stats['scored']} scored verdicts"]
        if verdict_by == "text":
            notes.append(f"{evaluator.stats['unparsed']} unparseable answers (counted as ties)")
        if isinstance(lm, LocalLM) and lm.truncated:
            notes.append(f"{lm.truncated} prompts cut from the left to fit the model")
            lm.truncated = 0
        print(f"\n== {strategy.name} ({'; '.join(notes)})\n{format_report(report)}")
        results["strategies"][strategy.name] = {**report["subsets"], "stats": evaluator.stats,
                                                "seconds": seconds}
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out_dir / 'results.json'}")


if __name__ == "__main__":
    run_main(main)
