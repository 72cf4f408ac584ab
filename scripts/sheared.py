"""Sheared-LLaMA at small scale: prune a trained model to a target shape with learned hard-concrete
masks, compact it, continue training it with and without dynamic batch loading, and compare it with
a naive pruning (weight magnitude) and a model of the same shape trained from scratch, all on the
same number of tokens after the source, over several seeds.

    python scripts/sheared.py                               # minutes on a laptop CPU
    python scripts/sheared.py --init-from path/to/hf-llama --target sheared-llama-1.3b --seeds 0 \\
        --block-size 4096 --batch-size 8 --prune-batch-size 1 --grad-accum 32 --prune-steps 3200 \\
        --continue-steps 48000 --fsdp true --domains web=data/web code=data/code ...
                                            # under torchrun on 8 GPUs: the authors' 32 / 256 sequences

Stages (each leaves a file in --out-dir and is skipped when that file exists, so a killed run
resumes at the stage it was in): the domains (three from the standard library by default:
docstrings, library code, test code), the source model (trained with the first seed, or
--init-from), its per-domain losses as the reference for dynamic batch loading, the magnitude-pruned
model; then per seed: pruning (`prune_steps`, masks and weights trained together, the target warmed
up over the first `prune_warmup_fraction` of them; `prune_batch_size` sequences a step, a small
batch as in the authors' runs), compaction, continued training. The baselines get
`continue_steps` plus the pruning's tokens in steps of `batch_size`, so every model of the target
shape has seen the same number of tokens after the source. The table reports, per seed, each
kind's expected sparsity at the end of pruning against its target, and whether every row ended
within 0.02 of it.
"""

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minillm import distributed
from minillm.checkpoint import load_model, save_model
from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import TokenDataset, parse_domains, prepare
from minillm.errors import UserError, run_main
from minillm.evaluate import evaluate_loss
from minillm.model import GPT, ModelConfig, preset
from minillm.methods.sheared import (KINDS, DynamicBatchLoading, PruningSchedule, ShearingMasks,
                                     TargetShape, compact, load_reference_losses, magnitude_masks)
from minillm.tokenizer import tokenizer_from_dict, train_bpe
from minillm.train import TrainConfig, Trainer

ON_TARGET = 0.02  # pruning ends on target when every row's expected sparsity is this close to it


@dataclass
class ShearedConfig:
    out_dir: str = "out/sheared"
    data_dir: str = field(default="data/sheared", metadata={
        "help": "where the default domains are prepared (when --domains is not given)"})
    domains: list[str] = field(default_factory=list, metadata={
        "help": "prepared dataset folders as NAME=PATH; default: three standard-library domains"})
    init_from: str | None = field(default=None, metadata={
        "help": "source model: a Hugging Face folder or a minillm checkpoint (else one is trained)"})
    source_preset: str = "tiny-llama"
    source_steps: int = 2000
    source_lr: float = 2e-3
    target: str | None = field(default=None, metadata={"help": "target shape from a preset, e.g. "
                                                                "sheared-llama-1.3b"})
    target_n_layer: int = 2
    target_n_head: int = 2
    target_n_embd: int = 64
    target_ffn_hidden: int = 128
    prune_steps: int = 400
    prune_batch_size: int = field(default=2, metadata={
        "help": "sequences per pruning step (the authors prune with 32, continue with 256: 1/8)"})
    prune_warmup_fraction: float = field(default=0.2, metadata={
        "help": "share of the pruning steps over which the target rises linearly from 0 (the "
                "authors: 640 of 3,200)"})
    continue_steps: int = 450
    mask_lr: float = field(default=1.0, metadata={"help": "peak lr of the masks (the authors' lag_lr)"})
    lambda_lr: float = field(default=1.0, metadata={"help": "peak lr of the Lagrange multipliers"})
    lr: float = field(default=2e-3, metadata={"help": "peak lr of the weights while pruning and of "
                                                       "the pruned model's continued training"})
    magnitude_lr: float = field(default=4e-3, metadata={"help": "peak lr of the magnitude-pruned model"})
    scratch_lr: float = field(default=4e-3, metadata={"help": "peak lr of the model from scratch"})
    block_size: int = 64
    batch_size: int = 16
    grad_accum: int = 1
    eval_interval: int = field(default=25, metadata={"help": "dynamic batch loading updates every "
                                                              "this many steps (m)"})
    eval_batches: int = 8
    dbl_eta: float = 1.0
    reference: str | None = field(default=None, metadata={
        "help": "JSON {domain: loss} of reference losses; default: the source model's losses"})
    fsdp: bool = False
    device: str = "auto"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={
        "help": "one pruning and one run of each arm per seed; the source is trained with the first"})
    threads: int = field(default=1, metadata={"help": "torch CPU threads"})


# --- data -------------------------------------------------------------------------------------------

def stdlib_domains(data_dir: Path, max_chars: int = 1_500_000) -> list[str]:
    """Three domains every Python installation carries: docstrings (English), library code and
    test code (each source file cut into chunks of 40 lines), prepared with one tokenizer."""
    import sysconfig
    root = Path(sysconfig.get_paths()["stdlib"])

    def chunks(paths):
        total = 0
        for path in paths:
            lines = path.read_text(errors="replace").splitlines()
            for i in range(0, len(lines), 40):
                text = "\n".join(lines[i:i + 40]).strip()
                if len(text) > 200:
                    total += len(text)
                    yield text
                if total > max_chars:
                    return

    def capped(docs):
        total = 0
        for d in docs:
            total += len(d)
            yield d
            if total > max_chars:
                return

    library = sorted(p for p in root.glob("*.py"))
    tests = sorted((root / "test").glob("test_*.py"))
    texts = {"docs": list(capped(stdlib_docstrings())), "code": list(chunks(library)),
             "tests": list(chunks(tests))}
    texts = {k: v for k, v in texts.items() if v}
    if all((data_dir / name / "meta.json").is_file() for name in texts):
        return [f"{name}={data_dir / name}" for name in texts]
    tok = train_bpe([t for docs in texts.values() for t in docs[::3]], vocab_size=2048)
    for name, docs in texts.items():
        prepare(docs, tok, data_dir / name, val_fraction=0.05, progress=False)
    return [f"{name}={data_dir / name}" for name in texts]


def domain_losses(model: GPT, domains: list[str], cfg: ShearedConfig) -> dict[str, float]:
    """Validation loss of `model` (whole, not sharded, on its device) per domain on fixed windows,
    the same for every model; called on the main process only."""
    return {name: evaluate_loss(model, TokenDataset(path, "val"), cfg.block_size, cfg.batch_size,
                                cfg.eval_batches, rank=0, world_size=1)["loss"]
            for name, (path, _) in parse_domains(domains).items()}


def compact_pruned(checkpoint: Path, target: TargetShape) -> tuple[GPT, object, dict]:
    """The compact model from the pruning run's final checkpoint (a full state dict, also under
    FSDP): rebuild the masked model on the CPU, take the final masks, remove what they prune.
    Also {kind: each row's expected sparsity} at the end of pruning, for the table."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(ModelConfig(**state["model_config"]))
    model.mask_source = masks = ShearingMasks(model.config, target)
    model.load_state_dict(state["model"])
    rows = {k: v.tolist() for k, v in masks.row_sparsity().items()}
    return compact(model, masks.final_masks()), tokenizer_from_dict(state["tokenizer"]), rows


def on_main(dist, fn, *args) -> None:
    """Run `fn` on the main process only (it writes files); the others wait for it."""
    if dist.is_main:
        fn(*args)
    if dist.enabled:
        torch.distributed.barrier()


# --- stages -----------------------------------------------------------------------------------------

def train(cfg: ShearedConfig, domains, name: str, steps: int, dist, lr: float, seed: int,
          **kw) -> tuple[Path, dict]:
    """Train one stage; (its final checkpoint, the mixture weights at its end). A stage whose
    final checkpoint exists is not trained again."""
    final = Path(cfg.out_dir) / name / f"ckpt_{steps:07d}.pt"
    if final.is_file():
        state = torch.load(final, map_location="cpu", weights_only=True, mmap=True)
        print(f"--- {name}: done ({final})")
        return final, state["loader"][0]["weights"]
    train_cfg = TrainConfig(data=domains, out_dir=str(Path(cfg.out_dir) / name), max_steps=steps,
                            block_size=cfg.block_size, batch_size=cfg.batch_size,
                            grad_accum=cfg.grad_accum, lr=lr, warmup_steps=min(20, steps // 10),
                            eval_interval=cfg.eval_interval if kw.pop("evaluate", False) else 0,
                            eval_batches=cfg.eval_batches, ckpt_interval=steps, overwrite=True,
                            log_interval=max(steps // 4, 1), fsdp=cfg.fsdp, seed=seed,
                            progress=False, **kw.pop("train", {}))
    print(f"--- {name}: {steps} steps")
    trainer = Trainer(train_cfg, dist, **kw)
    trainer.train()
    # The final checkpoint holds the whole model, also after a sharded (FSDP) run.
    return trainer.checkpoint_path, dict(zip(trainer.loader.names, trainer.loader.weights.tolist()))


def prune(cfg: ShearedConfig, domains, source_path: Path, target: TargetShape, seed: int, dist,
          pruned_path: Path) -> None:
    """Masks and weights trained together (the expected sparsity of each kind against its target
    printed on log steps), then the final masks and compaction into `pruned_path`."""
    holder = {}

    def attach(model):
        holder["masks"] = model.mask_source = ShearingMasks(model.config, target, cfg.mask_lr,
                                                            cfg.lambda_lr)
        return model

    log_every = max(cfg.prune_steps // 10, 1)
    pruner = Trainer(TrainConfig(data=domains, out_dir=str(Path(cfg.out_dir) / f"seed{seed}" / "prune"),
                                 init_from=str(source_path), max_steps=cfg.prune_steps,
                                 block_size=cfg.block_size, batch_size=cfg.prune_batch_size,
                                 grad_accum=cfg.grad_accum, lr=cfg.lr,
                                 warmup_steps=max(cfg.prune_steps // 10, 1), eval_interval=0,
                                 ckpt_interval=cfg.prune_steps, overwrite=True, fsdp=cfg.fsdp,
                                 log_interval=log_every, seed=seed, progress=False), dist,
                     model_transform=attach)
    pruner.callbacks.append(PruningSchedule(holder["masks"],
                                            round(cfg.prune_warmup_fraction * cfg.prune_steps)))
    print(f"--- pruning, seed {seed}: {cfg.prune_steps} steps (expected sparsity / target per kind)")
    for record in pruner.train():
        if "sparsity/layer" in record and dist.is_main:
            print(f"    step {record['step']:>5}  " + "  ".join(
                f"{k} {record[f'sparsity/{k}']:.3f}/{record[f'target/{k}']:.3f}" for k in KINDS)
                + f"  lagrangian {float(record['lagrangian']):+.3f}")

    def finish():
        small, tokenizer, rows = compact_pruned(pruner.checkpoint_path, target)
        save_model(pruned_path, small, tokenizer, extra={"row_sparsity": rows})
    on_main(dist, finish)


def check_stamp(cfg: ShearedConfig, out: Path, dist) -> None:
    """Stages are reused only by a run with the same settings: the first run writes them to
    `settings.json`; a rerun with other settings is refused by field. Seeds and threads may
    change (each seed's stages are its own)."""
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device", "seeds", "threads")}
    path = out / "settings.json"
    exists = path.is_file()
    if dist.enabled:  # every process has looked before the main one may write it
        torch.distributed.barrier()
    if exists:
        saved = json.loads(path.read_text())
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in mine.items()
                   if saved.get(k) != v]
        if changed:
            raise UserError(f"{out} holds a run with other settings ({'; '.join(changed)}): its "
                            "stages would be reused; pass another --out-dir")
    else:
        on_main(dist, path.write_text, json.dumps(mine, indent=1))


def target_shape(cfg: ShearedConfig) -> TargetShape:
    if cfg.target:
        return TargetShape.from_preset(cfg.target)
    return TargetShape(cfg.target_n_layer, cfg.target_n_head, cfg.target_n_embd, cfg.target_ffn_hidden)


def check_config(cfg: ShearedConfig) -> None:
    """A value no run can use is a one-line error before anything is trained."""
    for name in ("source_steps", "prune_steps", "continue_steps", "threads", "eval_batches",
                 "block_size", "batch_size", "prune_batch_size", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected at least 1")
    for name in ("source_lr", "lr", "magnitude_lr", "scratch_lr", "mask_lr", "lambda_lr"):
        if not getattr(cfg, name) > 0:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected a positive number")
    if not 0 <= cfg.prune_warmup_fraction <= 1:
        raise UserError(f"--prune-warmup-fraction {cfg.prune_warmup_fraction}: expected 0 to 1")
    if cfg.batch_size > 0 and (cfg.prune_steps * cfg.prune_batch_size) % cfg.batch_size:
        raise UserError(f"--prune-steps {cfg.prune_steps} x --prune-batch-size {cfg.prune_batch_size} "
                        f"is not a multiple of --batch-size {cfg.batch_size}: the baselines could not "
                        "get the same number of tokens")
    if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
        raise UserError(f"--seeds {cfg.seeds}: expected one or more distinct seeds")


ARMS = ("sheared + DBL", "sheared, static mix", "magnitude pruned", "from scratch")


def main(argv=None):
    cfg = parse_config(ShearedConfig, argv, description=__doc__)
    check_config(cfg)
    torch.set_num_threads(cfg.threads)
    wall, cpu = time.perf_counter(), time.process_time()
    if not cfg.init_from:  # a target that does not fit the source is an error before any training
        target_shape(cfg).counts(preset(cfg.source_preset))
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dist = distributed.setup(cfg.device)
    check_stamp(cfg, out, dist)
    if not cfg.domains:  # prepared by one process; the others wait, then find them ready
        on_main(dist, stdlib_domains, Path(cfg.data_dir))
    domains = cfg.domains or stdlib_domains(Path(cfg.data_dir))
    names = list(parse_domains(domains))

    # The source model and its per-domain losses (the reference of dynamic batch loading).
    source_path = out / "source.pt"
    if cfg.init_from:
        source_path = Path(cfg.init_from)
    elif not source_path.is_file():
        checkpoint, _ = train(cfg, domains, "source", cfg.source_steps, dist, cfg.source_lr,
                              cfg.seeds[0], train={"preset": cfg.source_preset})
        on_main(dist, lambda: save_model(source_path, *load_model(checkpoint)[:2]))
    source = load_model(source_path)[0] if source_path.is_file() else _load_hf(source_path)
    target = target_shape(cfg)
    target.counts(source.config)  # a target that does not fit is a named error before training
    source = source.to(dist.device)  # evaluated where the run trains (one process evaluates)
    if cfg.reference:
        reference = load_reference_losses(cfg.reference, names)
    else:
        on_main(dist, lambda: (out / "reference.json").write_text(
            json.dumps(domain_losses(source, domains, cfg), indent=1)))
        reference = load_reference_losses(out / "reference.json", names)

    # The naive pruning: one set of 0/1 masks by weight magnitude, no training.
    naive_path = out / "naive.pt"
    if not naive_path.is_file():
        on_main(dist, lambda: save_model(naive_path, compact(source, magnitude_masks(source, target))))

    # Per seed: targeted pruning, continued training, and the baselines at the same tokens.
    budget = cfg.continue_steps + pruning_steps_as_continued(cfg)
    runs = {}
    for seed in cfg.seeds:
        pruned_path = out / f"seed{seed}" / "pruned.pt"
        if not pruned_path.is_file():
            prune(cfg, domains, source_path, target, seed, dist, pruned_path)
        small_config = load_model(pruned_path)[0].config
        for arm, init, steps, lr, dbl in ((ARMS[0], pruned_path, cfg.continue_steps, cfg.lr, True),
                                          (ARMS[1], pruned_path, cfg.continue_steps, cfg.lr, False),
                                          (ARMS[2], naive_path, budget, cfg.magnitude_lr, False),
                                          (ARMS[3], None, budget, cfg.scratch_lr, False)):
            callbacks = [DynamicBatchLoading(reference, cfg.dbl_eta)] if dbl else []
            kw = {"train": {"init_from": str(init)}} if init else {"model_config": replace(small_config)}
            name = f"seed{seed}/" + arm.replace(" ", "_").replace(",", "").replace("+", "dbl")
            runs[arm, seed] = train(cfg, domains, name, steps, dist, lr, seed, evaluate=dbl,
                                    callbacks=callbacks, **kw)

    if dist.is_main:
        print_table(cfg, domains, reference, budget, source, target, runs)
        print(f"wall {time.perf_counter() - wall:.0f} s, CPU {time.process_time() - cpu:.0f} s "
              f"(this process), {cfg.threads} thread(s); load average at the end "
              f"{os.getloadavg()[0]:.1f}")
    distributed.cleanup()


def print_table(cfg, domains, reference, budget, source, target, runs) -> None:
    """One table: per arm and seed the loss right after pruning, the final loss (mean over the
    domains and per domain), the worst domain's excess over its reference and, for the targeted
    pruning, each kind's expected sparsity at the end of pruning and whether it ended on target."""
    names = list(parse_domains(domains))
    dev = source.wte.weight.device
    out = Path(cfg.out_dir)
    targets = [1 - kept / of for kept, of in target.counts(source.config).values()]
    naive = load_model(out / "naive.pt")[0].to(dev)
    naive_after = mean_loss(domain_losses(naive, domains, cfg))
    small = naive.config
    print(f"\nshape: {_shape(source.config)} -> {_shape(small)} (layers/heads/kv heads/d/ffn); "
          f"reference = {'--reference' if cfg.reference else 'the source model'}; every small model "
          f"gets {budget} steps' worth of {cfg.batch_size * cfg.block_size * cfg.grad_accum} tokens "
          f"after the source; pruning ({cfg.prune_steps} steps of {cfg.prune_batch_size} sequences) is "
          f"{100 * pruning_steps_as_continued(cfg) / budget:.0f}% of them; "
          f"peak lr: sheared {cfg.lr:g} (masks {cfg.mask_lr:g}, lambdas {cfg.lambda_lr:g}), magnitude "
          f"{cfg.magnitude_lr:g}, scratch {cfg.scratch_lr:g}")
    print("sparsity = expected sparsity at the end of pruning per kind (layer/head/ffn/hidden), "
          f"target {'/'.join(f'{t:.2f}' for t in targets)}; on target = every row within {ON_TARGET}")
    header = (f"{'model':<21}{'seed':>5}{'params':>9}{'pruned':>8}{'final':>8}"
              + "".join(f"{n[:7]:>8}" for n in names) + f"{'excess':>8}  {'sparsity':<20}{'on target':>10}")
    print(header)
    finals = {}

    def row(arm, seed, model, after, sparsity=None):
        final = domain_losses(model.to(dev), domains, cfg)
        finals.setdefault(arm, []).append(mean_loss(final))
        line = (f"{arm:<21}{seed:>5}{model.num_params() / 1e6:>8.2f}M"
                + (f"{after:>8.3f}" if after is not None else f"{'-':>8}")
                + f"{mean_loss(final):>8.3f}" + "".join(f"{final[n]:>8.3f}" for n in names)
                + f"{max(final[n] - reference[n] for n in names):>8.3f}")
        if sparsity is not None:
            gap = _worst_gap(sparsity, targets)
            line += ("  " + "/".join(f"{sum(r) / len(r):.2f}" for r in sparsity.values()).ljust(20)
                     + f"{'yes' if gap <= ON_TARGET else f'NO ({gap:.3f})':>10}")
        print(line)

    row("source", "-", source, None)
    for arm in ARMS:
        for seed in cfg.seeds:
            model = load_model(runs[arm, seed][0])[0]
            if arm in ARMS[:2]:
                pruned, _, extra = load_model(out / f"seed{seed}" / "pruned.pt")
                after = mean_loss(domain_losses(pruned.to(dev), domains, cfg))
                row(arm, seed, model, after, extra["row_sparsity"])
            else:
                row(arm, seed, model, naive_after if arm == ARMS[2] else None)
    print("mean final loss over seeds: " + ", ".join(
        f"{arm} {sum(v) / len(v):.3f} (range {min(v):.3f}-{max(v):.3f})" for arm, v in finals.items()
        if arm != "source"))
    print("final mixture weights with DBL: " + "; ".join(
        f"seed {seed}: " + ", ".join(f"{n} {w:.2f}" for n, w in runs[ARMS[0], seed][1].items())
        for seed in cfg.seeds))
    missed = [seed for seed in cfg.seeds
              if _worst_gap(load_model(out / f"seed{seed}" / "pruned.pt")[2]["row_sparsity"], targets) > ON_TARGET]
    if missed:
        print(f"pruning did NOT end on target (within {ON_TARGET} in every row) for seed(s) "
              f"{', '.join(map(str, missed))}: their final masks cut gates the masks still kept")


def pruning_steps_as_continued(cfg: ShearedConfig) -> int:
    """The pruning run's tokens in steps of the continued training (its batches are smaller)."""
    return cfg.prune_steps * cfg.prune_batch_size // cfg.batch_size


def mean_loss(losses: dict[str, float]) -> float:
    return sum(losses.values()) / len(losses)


def _worst_gap(rows: dict[str, list[float]], targets: list[float]) -> float:
    return max(abs(s - t) for r, t in zip(rows.values(), targets) for s in r)


def _shape(c) -> str:
    return f"{c.n_layer}/{c.n_head}/{c.n_kv_head}/{c.n_embd}/{c.ffn_hidden}"


def _load_hf(path: Path) -> GPT:
    if not path.is_dir():
        raise UserError(f"--init-from {path}: neither a minillm checkpoint nor a Hugging Face folder")
    from minillm.hf import load_hf
    return load_hf(path)


if __name__ == "__main__":
    run_main(main)
