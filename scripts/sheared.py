"""Sheared-LLaMA at small scale: prune a trained model to a target shape with learned hard-concrete
masks, compact it, continue training with dynamic batch loading, and compare with a naive pruning
(weight magnitude) and a model of the same shape trained from scratch on the same number of tokens.

    python scripts/sheared.py                               # minutes on a laptop CPU
    python scripts/sheared.py --init-from path/to/hf-llama --target sheared-llama-1.3b \\
        --block-size 4096 --batch-size 1 --grad-accum 64 --prune-steps 1500 --continue-steps 190000 \\
        --fsdp true --domains web=data/web code=data/code ...     # under torchrun on a GPU node

Stages (each leaves a file in --out-dir and is skipped when that file exists, so a killed run
resumes at the stage it was in): the domains (three from the standard library by default:
docstrings, library code, test code), the source model (trained, or --init-from), its per-domain
losses as the reference for dynamic batch loading, pruning (`prune_steps`, masks and weights
trained together, the target warmed up over `prune_warmup` steps), compaction, continued training.
The baselines get `prune_steps + continue_steps` steps, so every model of the target shape has
seen the same number of tokens after the source.
"""

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minillm import distributed
from minillm.cli import parse_config
from minillm.corpus import stdlib_docstrings
from minillm.data import TokenDataset, parse_domains, prepare
from minillm.errors import UserError, run_main
from minillm.evaluate import evaluate_loss
from minillm.model import GPT, ModelConfig, preset
from minillm.checkpoint import load_model, save_model
from minillm.methods.sheared import (DynamicBatchLoading, PruningSchedule, ShearingMasks,
                                     TargetShape, compact, load_reference_losses, magnitude_masks)
from minillm.tokenizer import tokenizer_from_dict, train_bpe
from minillm.train import TrainConfig, Trainer


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
    source_steps: int = 1000
    target: str | None = field(default=None, metadata={"help": "target shape from a preset, e.g. "
                                                                "sheared-llama-1.3b"})
    target_n_layer: int = 2
    target_n_head: int = 2
    target_n_embd: int = 64
    target_ffn_hidden: int = 128
    prune_steps: int = 200
    prune_warmup: int = field(default=100, metadata={"help": "steps over which the target is reached"})
    continue_steps: int = 250
    mask_lr: float = 0.1
    lambda_lr: float = 0.1
    lr: float = 2e-3
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
    seed: int = 0


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


def compact_pruned(checkpoint: Path, target: TargetShape) -> tuple[GPT, object]:
    """The compact model from the pruning run's final checkpoint (a full state dict, also under
    FSDP): rebuild the masked model on the CPU, take the final masks, remove what they prune."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = GPT(ModelConfig(**state["model_config"]))
    model.mask_source = ShearingMasks(model.config, target)
    model.load_state_dict(state["model"])
    return compact(model, model.mask_source.final_masks()), tokenizer_from_dict(state["tokenizer"])


def on_main(dist, fn, *args) -> None:
    """Run `fn` on the main process only (it writes files); the others wait for it."""
    if dist.is_main:
        fn(*args)
    if dist.enabled:
        torch.distributed.barrier()


# --- stages -----------------------------------------------------------------------------------------

def train(cfg: ShearedConfig, domains, name: str, steps: int, dist, **kw) -> tuple[Path, dict]:
    """Train one stage; (its final checkpoint, the mixture weights at its end). A stage whose
    final checkpoint exists is not trained again."""
    final = Path(cfg.out_dir) / name / f"ckpt_{steps:07d}.pt"
    if final.is_file():
        state = torch.load(final, map_location="cpu", weights_only=True, mmap=True)
        print(f"--- {name}: done ({final})")
        return final, state["loader"][0]["weights"]
    train_cfg = TrainConfig(data=domains, out_dir=str(Path(cfg.out_dir) / name), max_steps=steps,
                            block_size=cfg.block_size, batch_size=cfg.batch_size,
                            grad_accum=cfg.grad_accum, lr=cfg.lr, warmup_steps=min(20, steps // 10),
                            eval_interval=cfg.eval_interval if kw.pop("evaluate", False) else 0,
                            eval_batches=cfg.eval_batches, ckpt_interval=steps, overwrite=True,
                            log_interval=max(steps // 4, 1), fsdp=cfg.fsdp, seed=cfg.seed,
                            progress=False, **kw.pop("train", {}))
    print(f"--- {name}: {steps} steps")
    trainer = Trainer(train_cfg, dist, **kw)
    trainer.train()
    # The final checkpoint holds the whole model, also after a sharded (FSDP) run.
    return trainer.checkpoint_path, dict(zip(trainer.loader.names, trainer.loader.weights.tolist()))


def check_stamp(cfg: ShearedConfig, out: Path, dist) -> None:
    """Stages are reused only by a run with the same settings: the first run writes them to
    `settings.json`; a rerun with other settings is refused by field."""
    mine = {k: v for k, v in asdict(cfg).items() if k not in ("out_dir", "device")}
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


def main(argv=None):
    cfg = parse_config(ShearedConfig, argv, description=__doc__)
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
        checkpoint, _ = train(cfg, domains, "source", cfg.source_steps, dist,
                              train={"preset": cfg.source_preset})
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

    # Targeted pruning: masks and weights trained together, then the final masks and compaction.
    pruned_path = out / "pruned.pt"
    if not pruned_path.is_file():
        holder = {}

        def attach(model):
            holder["masks"] = model.mask_source = ShearingMasks(model.config, target, cfg.mask_lr,
                                                                cfg.lambda_lr)
            return model

        pruner = Trainer(TrainConfig(data=domains, out_dir=str(out / "prune"), init_from=str(source_path),
                                     max_steps=cfg.prune_steps, block_size=cfg.block_size,
                                     batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, lr=cfg.lr,
                                     warmup_steps=min(20, cfg.prune_steps // 10), eval_interval=0,
                                     ckpt_interval=cfg.prune_steps, overwrite=True, fsdp=cfg.fsdp,
                                     log_interval=max(cfg.prune_steps // 4, 1), seed=cfg.seed,
                                     progress=False), dist, model_transform=attach)
        pruner.callbacks.append(PruningSchedule(holder["masks"], cfg.prune_warmup))
        print(f"--- pruning: {cfg.prune_steps} steps")
        pruner.train()
        on_main(dist, lambda: save_model(pruned_path, *compact_pruned(pruner.checkpoint_path, target)))
    pruned, tokenizer, _ = load_model(pruned_path)
    naive_path = out / "naive.pt"
    if not naive_path.is_file():
        on_main(dist, lambda: save_model(naive_path, compact(source, magnitude_masks(source, target)),
                                         tokenizer))
    naive = load_model(naive_path)[0]

    # Continued training, and the baselines at the same number of tokens.
    budget = cfg.prune_steps + cfg.continue_steps
    runs = {}
    for name, init, steps, dbl in (("sheared + DBL", pruned_path, cfg.continue_steps, True),
                                   ("sheared, static mix", pruned_path, cfg.continue_steps, False),
                                   ("magnitude pruned", naive_path, budget, False),
                                   ("from scratch", None, budget, False)):
        callbacks = [DynamicBatchLoading(reference, cfg.dbl_eta)] if dbl else []
        kw = {"train": {"init_from": str(init)}} if init else {"model_config": replace(pruned.config)}
        runs[name] = train(cfg, domains, name.replace(" ", "_").replace(",", "").replace("+", "dbl"),
                           steps, dist, evaluate=dbl, callbacks=callbacks, **kw)

    if dist.is_main:
        print_table(cfg, domains, reference, budget, source, pruned, naive, runs)
    distributed.cleanup()


def print_table(cfg, domains, reference, budget, source, pruned, naive, runs) -> None:
    names = list(parse_domains(domains))
    dev = source.wte.weight.device
    rows = [("source", source, None),
            ("sheared + DBL", load_model(runs["sheared + DBL"][0])[0], domain_losses(pruned.to(dev), domains, cfg)),
            ("sheared, static mix", load_model(runs["sheared, static mix"][0])[0], None),
            ("magnitude pruned", load_model(runs["magnitude pruned"][0])[0],
             domain_losses(naive.to(dev), domains, cfg)),
            ("from scratch", load_model(runs["from scratch"][0])[0], None)]
    print(f"\nshape: {_shape(source.config)} -> {_shape(pruned.config)} (layers/heads/kv heads/"
          f"d/ffn); reference = {'--reference' if cfg.reference else 'the source model'}; "
          f"{budget} steps of {cfg.batch_size * cfg.block_size * cfg.grad_accum} tokens for "
          f"every pruned or small model")
    header = f"{'model':<21}{'params':>9}{'after pruning':>15}{'final loss':>12}"
    print(header + "".join(f"{n:>9}" for n in names) + f"{'worst excess':>14}")
    for name, model, after in rows:
        model = model.to(source.wte.weight.device)
        final = domain_losses(model, domains, cfg)
        worst = max(final[n] - reference[n] for n in names)
        line = f"{name:<21}{model.num_params() / 1e6:>8.2f}M"
        line += f"{sum(after.values()) / len(after):>15.3f}" if after else f"{'-':>15}"
        line += f"{sum(final.values()) / len(final):>12.3f}" + "".join(f"{final[n]:>9.3f}" for n in names)
        print(line + f"{worst:>14.3f}")
    print("final mixture weights with DBL: " + ", ".join(
        f"{n} {w:.2f}" for n, w in runs["sheared + DBL"][1].items()))


def _shape(c) -> str:
    return f"{c.n_layer}/{c.n_head}/{c.n_kv_head}/{c.n_embd}/{c.ffn_hidden}"


def _load_hf(path: Path) -> GPT:
    if not path.is_dir():
        raise UserError(f"--init-from {path}: neither a minillm checkpoint nor a Hugging Face folder")
    from minillm.hf import load_hf
    return load_hf(path)


if __name__ == "__main__":
    run_main(main)
