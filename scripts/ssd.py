"""SSD (switchable sparse-dense training, minillm/methods/ssd.py) against dense training on the same data.

    python scripts/ssd.py                 # the default comparison (see DESIGN.md, "Method: SSD")
    python scripts/ssd.py --tiny true     # seconds: a smoke run

For each seed: an SSD run of `--max-steps` steps; a dense run of the same steps; a dense run with
as many steps as fit in the SSD run's executed training FLOPs (the baseline at equal compute: its
cosine schedule is laid out over its own, shorter run). FLOPs are counted as executed by
`minillm.methods.ssd.FlopMeter` in all runs. Then the final SSD model is evaluated dense and as an MoE at
several top-k (same weights), with its inference tokens/s. Prints mean +- sd over the seeds and
writes `results.json` in `--out-dir`.
"""

import copy
import resource
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import TokenDataset, eval_batches, prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError, run_main
from minillm.model import ModelSize, preset
from minillm.methods.ssd import SSD, SSDConfig, check_ssd, dense_flop_meter, to_moe
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer


@dataclass
class Config(ModelSize):
    out_dir: str = field(default="out/ssd", metadata={"help": "runs and results.json"})
    data_dir: str = field(default="data/ssd", metadata={"help": "token shards (made if missing)"})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    max_steps: int = 300
    batch_size: int = 16
    lr: float = field(default=1e-3, metadata={
        "help": "peak learning rate (at 3e-3 the short dense baselines swing by more than the effect)"})
    num_experts: int = 8
    top_k: int = 2
    check_interval: int = 25
    stable_ari: float = 0.6
    drift_ari: float = 0.3
    min_dense_steps: int = 50
    redense_steps: int = 25
    sparse_steps: int = 100
    final_dense_steps: int = 25
    eval_k: list[int] = field(default_factory=lambda: [1, 2, 4, 8], metadata={
        "help": "top-k at which the final model is evaluated as an MoE"})
    threads: int = field(default=2, metadata={"help": "torch CPU threads"})
    tiny: bool = field(default=False, metadata={"help": "a seconds-long smoke run"})


def tiny(cfg: Config) -> Config:
    return Config(**{**asdict(cfg), "seeds": cfg.seeds[:2], "max_steps": 24, "n_embd": 32,
                     "block_size": 32, "batch_size": 4, "num_experts": 4, "eval_k": [1, 4],
                     "check_interval": 4, "stable_ari": -1.0, "drift_ari": -1.0,
                     "min_dense_steps": 4, "redense_steps": 4, "sparse_steps": 8,
                     "final_dense_steps": 4, "threads": 1})


def make_data(cfg: Config) -> Path:
    path = Path(cfg.data_dir)
    if not (path / "meta.json").is_file():
        docs = list(stdlib_docstrings(max_files=40 if cfg.tiny else 400))
        print(f"tokenizer and shards from {len(docs)} standard-library docstrings ...")
        prepare(docs, train_bpe(docs, vocab_size=300 if cfg.tiny else 1024), path,
                val_fraction=0.05, progress=False)
    return path


def train_config(cfg: Config, data: Path, name: str, seed: int, steps: int) -> TrainConfig:
    return TrainConfig(data=[str(data)], out_dir=str(Path(cfg.out_dir) / f"{name}_seed{seed}"),
                       block_size=cfg.block_size, batch_size=cfg.batch_size, max_steps=steps,
                       lr=cfg.lr, warmup_steps=max(steps // 20, 1), eval_interval=0, ckpt_interval=0,
                       log_interval=max(steps, 1), seed=seed, overwrite=True, progress=False)


@torch.no_grad()
def val_loss(model, data: Path, cfg: Config) -> float:
    """Mean loss over the first 64 validation windows (the same for every run)."""
    model.eval()
    dataset = TokenDataset(str(data), "val")
    losses = [float(model(x, y).loss) for x, y, _ in eval_batches(
        dataset, cfg.block_size, cfg.batch_size, 64, 0, 1, torch.device("cpu"))]
    return sum(losses) / len(losses)


@torch.no_grad()
def tokens_per_s(model, cfg: Config, repeats: int = 5) -> float:
    """Forward-pass throughput on a fixed batch (fastest of `repeats`)."""
    model.eval()
    x = torch.randint(0, model.config.vocab_size, (cfg.batch_size, cfg.block_size))
    model(x)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - t0)
    return x.numel() / best


def run(cfg: Config, data: Path, seed: int, tokenizer_vocab: int) -> dict:
    model_cfg = preset("tiny-gpt", vocab_size=tokenizer_vocab, activation="relu", **cfg.sizes())
    ssd = SSD(SSDConfig(num_experts=cfg.num_experts, top_k=cfg.top_k,
                        check_interval=cfg.check_interval, stable_ari=cfg.stable_ari,
                        drift_ari=cfg.drift_ari, min_dense_steps=cfg.min_dense_steps,
                        redense_steps=cfg.redense_steps, sparse_steps=cfg.sparse_steps,
                        final_dense_steps=cfg.final_dense_steps, seed=seed))
    out = {}
    t0 = time.perf_counter()
    trainer = Trainer(train_config(cfg, data, "ssd", seed, cfg.max_steps), DistInfo(),
                      callbacks=[ssd], model_config=model_cfg)
    check_ssd(trainer.model, ssd.cfg)
    trainer.train()
    summary = ssd.summary()
    out["ssd"] = {"val_loss": val_loss(trainer.model, data, cfg), "wall_s": time.perf_counter() - t0,
                  "flops": summary["flops"]["executed"], "useful_flops": summary["flops"]["useful"],
                  "steps": summary["steps"], "seconds": summary["seconds"],
                  "switches": [(e["step"], e["event"], e["reason"]) for e in summary["switches"]],
                  "checks": [e for e in ssd.events if "check" in e["event"]]}
    print(f"seed {seed} SSD: " + ", ".join(f"step {s} {e} ({why})" for s, e, why in out["ssd"]["switches"])
          + f"; ARI at checks: {[round(c['ari'], 2) for c in out['ssd']['checks'] if c['ari'] is not None]}")
    final = trainer.model
    for name, steps in (("dense", cfg.max_steps), ("dense_equal_flops", None)):
        if steps is None:  # as many dense steps as the SSD run's FLOPs pay for
            steps = max(int(summary["flops"]["executed"] / out["dense"]["flops_per_step"]), 1)
        t0 = time.perf_counter()
        dense = Trainer(train_config(cfg, data, name, seed, steps), DistInfo(), model_config=model_cfg)
        meter = dense_flop_meter(dense)
        dense.train()
        out[name] = {"val_loss": val_loss(dense.model, data, cfg), "wall_s": time.perf_counter() - t0,
                     "flops": meter.total, "steps": steps, "flops_per_step": meter.total / steps}
    inference = {"dense": {"val_loss": out["ssd"]["val_loss"], "tokens_per_s": tokens_per_s(final, cfg)}}
    for k in cfg.eval_k:
        sparse = to_moe(copy.deepcopy(final), top_k=k, num_experts=cfg.num_experts)
        inference[f"top-{k}"] = {"val_loss": val_loss(sparse, data, cfg),
                                 "tokens_per_s": tokens_per_s(sparse, cfg)}
    out["inference"] = inference
    return out


def mean_sd(values: list[float], fmt: str = "{:.4f}") -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(statistics.mean(values))} +- {fmt.format(sd)}"


def report(results: list[dict], cfg: Config) -> None:
    n = len(results)
    print(f"\n{n} seed(s); {cfg.max_steps} steps of {cfg.batch_size} x {cfg.block_size} tokens; "
          f"{cfg.num_experts} experts, top-{cfg.top_k} in sparse steps")
    print(f"{'run':<20} {'steps':>14} {'val loss':>18} {'train TFLOP (exec)':>22} {'wall s':>16}")
    for name in ("ssd", "dense", "dense_equal_flops"):
        rows = [r[name] for r in results]
        steps = (mean_sd([r["steps"]["dense"] + r["steps"]["sparse"] for r in rows], "{:.0f}")
                 if name == "ssd" else mean_sd([r["steps"] for r in rows], "{:.0f}"))
        print(f"{name:<20} {steps:>14} {mean_sd([r['val_loss'] for r in rows]):>18} "
              f"{mean_sd([r['flops'] / 1e12 for r in rows], '{:.3f}'):>22} "
              f"{mean_sd([r['wall_s'] for r in rows], '{:.1f}'):>16}")
    ssd = [r["ssd"] for r in results]
    print("SSD useful TFLOP (padding slots left out): "
          + mean_sd([r["useful_flops"] / 1e12 for r in ssd], "{:.3f}"))
    total = [sum(r["seconds"].values()) for r in ssd]
    print("SSD time share: " + ", ".join(
        f"{phase} {mean_sd([100 * r['seconds'][phase] / t for r, t in zip(ssd, total)], '{:.1f}')}%"
        for phase in ("dense", "sparse", "monitor", "switch")))
    print("SSD steps sparse: " + mean_sd([r["steps"]["sparse"] for r in ssd], "{:.0f}")
          + "; switches (seed 0): " + ", ".join(f"{s} {e} ({why})" for s, e, why in ssd[0]["switches"]))
    print(f"\nfinal SSD model, same weights: {'mode':<10} {'val loss':>18} {'tokens/s':>20}")
    for mode in results[0]["inference"]:
        rows = [r["inference"][mode] for r in results]
        print(f"{'':<30} {mode:<10} {mean_sd([r['val_loss'] for r in rows]):>18} "
              f"{mean_sd([r['tokens_per_s'] for r in rows], '{:,.0f}'):>20}")
    win = [r["ssd"]["val_loss"] < r["dense_equal_flops"]["val_loss"] for r in results]
    print(f"\nSSD below the dense run of equal executed FLOPs in {sum(win)} of {n} seed(s)")


def main(argv=None):
    cfg = parse_config(Config, argv, description=__doc__)
    if cfg.tiny:
        cfg = tiny(cfg)
    if cfg.top_k > cfg.num_experts or any(not 1 <= k <= cfg.num_experts for k in cfg.eval_k):
        raise UserError(f"--top-k {cfg.top_k} / --eval-k {cfg.eval_k}: each must be between 1 and "
                        f"--num-experts {cfg.num_experts}")
    if cfg.threads < 1:
        raise UserError(f"--threads {cfg.threads}: expected at least 1")
    torch.set_num_threads(cfg.threads)
    data = make_data(cfg)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    t0 = time.perf_counter()
    results = []
    for seed in cfg.seeds:
        results.append(run(cfg, data, seed, vocab))
        print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)")
    report(results, cfg)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"total {time.perf_counter() - t0:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s "
          f"CPU, {cfg.threads} thread(s); load average at the end {os.getloadavg()[0]:.1f}")
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "results.json").write_text(json.dumps(
        {"config": asdict(cfg), "results": results}, indent=1))


if __name__ == "__main__":
    run_main(main)
