"""Rectify-Router at small scale: tiny MoE language models with vanilla top-1 / top-2 routing and
with Intra-GPU and Fill-in Rectification, same data and budget, over seeds and capacity factors.

    python scripts/rectify_router.py                  # 30 runs (5 variants, 2 cf, 3 seeds)
    python scripts/rectify_router.py --seeds 5 --capacity-factors 0.25 0.5 1.0 --max-steps 500

Each run trains a GPT (`--n-layer` blocks, every other FFN an MoE layer of `--num-experts`
experts; minillm.moe.replace_ffns_with_moe) for `--max-steps` steps, then evaluates once on the same
validation batches in two ways: dropless (the headline: every token reaches its top-k experts, so
no variant is favoured by how it handles capacity at test time) and at the training capacity (plan
transforms on, as the variant would run in production). Dropped and padding shares are averaged
over the last training steps. The table gives mean +- sd over seeds; every run's figures are in
`OUT_DIR/results.jsonl` and the table in `OUT_DIR/table.md`. Running again into the same folder
starts every run over.
"""

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from minillm import distributed
from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.model import ModelSize
from minillm.moe import MoE, MoEConfig, replace_ffns_with_moe
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer

VARIANTS = {  # name: (top-k, plan transforms)
    "top-1": (1, []),
    "top-2": (2, []),
    "top-1 + Intra-GPU": (1, ["intra"]),
    "top-1 + Fill-in": (1, ["fill"]),
    "top-1 + both": (1, ["intra", "fill"]),
}
STATS = ("dropped_fraction", "dropped_tokens_fraction", "padding_fraction")


@dataclass
class RectifyConfig(ModelSize):  # block 1's FFN is the MoE layer
    data_dir: str = field(default="data/rectify", metadata={"help": "prepared here if missing"})
    out_dir: str = "out/rectify_router"
    max_files: int | None = field(default=None, metadata={
        "help": "standard-library files read for the corpus when preparing (default: all)"})
    vocab_size: int = 2048
    val_fraction: float = 0.02
    max_steps: int = 300
    batch_size: int = 16
    num_experts: int = 8
    expert_hidden: int = 64
    capacity_factors: list[float] = field(default_factory=lambda: [0.5, 1.0])
    seeds: int = 3
    num_devices: int = 2
    dropped_when: str = field(default="all", metadata={"help": "all, any or all_but_one"})
    eval_batches: int = 16
    variants: list[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "a subset of: " + ", ".join(VARIANTS)})


class RoutingStats:
    """Averages the MoE layers' routing statistics over the last `window` training steps."""

    def __init__(self, window: int = 50):
        self.window, self.rows = window, []

    def on_step_end(self, trainer, record):
        layers = [m for m in trainer.model.modules() if isinstance(m, MoE)]
        self.rows.append([sum(float(m.stats[k]) for m in layers) / len(layers) for k in STATS])
        self.rows = self.rows[-self.window:]

    def mean(self) -> dict[str, float]:
        return {k: sum(col) / len(col) for k, col in zip(STATS, zip(*self.rows))}


class Evaluations:
    """Records the trainer's evaluations (the one at the end of training routes dropless)."""

    def __init__(self):
        self.results = []

    def on_eval(self, trainer, result):
        self.results.append(result)


def val_loss_at_capacity(trainer: Trainer) -> float:
    """The trainer's validation loss (the same batches as its own evaluation) with the MoE layers
    routing at their training capacity, the variant's plan transforms on."""
    layers = [m for m in trainer.model.modules() if isinstance(m, MoE)]
    for m in layers:
        m.cfg = replace(m.cfg, eval_dropless=False)
    try:
        return trainer.evaluate()["val_loss"]
    finally:
        for m in layers:
            m.cfg = replace(m.cfg, eval_dropless=True)


def run(cfg: RectifyConfig, dist, variant: str, cf: float, seed: int) -> dict:
    k, steps = VARIANTS[variant]
    moe_cfg = MoEConfig(num_experts=cfg.num_experts, top_k=k, expert_hidden=cfg.expert_hidden,
                        capacity_factor=cf, min_capacity=1)
    transforms = [IntraGPURectification(cfg.num_devices, cfg.dropped_when) if s == "intra"
                  else FillInRectification() for s in steps]
    name = f"{variant.replace(' ', '')}_cf{cf}_seed{seed}"
    train_cfg = TrainConfig(data=[cfg.data_dir], out_dir=f"{cfg.out_dir}/{name}", preset="tiny-gpt",
                            **cfg.sizes(),
                            batch_size=cfg.batch_size, max_steps=cfg.max_steps,
                            warmup_steps=min(20, cfg.max_steps // 5), eval_interval=cfg.max_steps,
                            eval_batches=cfg.eval_batches, ckpt_interval=0, seed=seed,
                            overwrite=True, progress=False, log_interval=cfg.max_steps)
    stats, evals = RoutingStats(), Evaluations()
    trainer = Trainer(train_cfg, dist, callbacks=[stats, evals],
                      model_transform=lambda m: replace_ffns_with_moe(m, moe_cfg,
                                                                      plan_transforms=transforms))
    t0 = time.perf_counter()
    trainer.train()  # evaluates once, dropless, at the end
    result = {"variant": variant, "capacity_factor": cf, "seed": seed,
              "val_loss_dropless": evals.results[-1]["val_loss"],
              "val_loss_at_capacity": val_loss_at_capacity(trainer), **stats.mean(),
              "seconds": time.perf_counter() - t0}
    print(json.dumps(result), flush=True)
    return result


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def table(results: list[dict], seeds: int) -> str:
    lines = [f"mean +- sd over {seeds} seed(s); losses on the same validation batches; shares "
             "averaged over the last training steps\n",
             "| variant | cf | val loss, dropless eval | val loss, eval at capacity | dropped "
             "entries | dropped tokens | padding |", "|---|---|---|---|---|---|---|"]
    for cf in sorted({r["capacity_factor"] for r in results}):
        for variant in VARIANTS:
            rows = [r for r in results if r["variant"] == variant and r["capacity_factor"] == cf]
            if not rows:
                continue
            shares = [statistics.mean(r[k] for r in rows) for k in STATS]
            lines.append(f"| {variant} | {cf} | {mean_sd([r['val_loss_dropless'] for r in rows])} | "
                         f"{mean_sd([r['val_loss_at_capacity'] for r in rows])} | "
                         + " | ".join(f"{s:.3f}" for s in shares) + " |")
    return "\n".join(lines) + "\n"


def main():
    cfg = parse_config(RectifyConfig, description=__doc__)
    unknown = set(cfg.variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")
    data = Path(cfg.data_dir)
    if not (data / "meta.json").is_file():
        docs = list(stdlib_docstrings(cfg.max_files))
        prepare(docs, train_bpe(docs, vocab_size=cfg.vocab_size), data,
                val_fraction=cfg.val_fraction, progress=False)
    dist = distributed.setup("auto")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # seed-major, so that an interrupted sweep has every variant at the seeds it finished
    results = [run(cfg, dist, variant, cf, seed)
               for seed in range(cfg.seeds) for cf in cfg.capacity_factors for variant in cfg.variants]
    text = table(results, cfg.seeds)
    if dist.is_main:
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
        (out / "table.md").write_text(text)
        print("\n" + text + f"\n{len(results)} runs in {time.perf_counter() - t0:.0f} s")
    distributed.cleanup()


if __name__ == "__main__":
    main()
