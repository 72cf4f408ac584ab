"""Checkpoints: model files, training checkpoints, resume, and the newest checkpoint that loads.

Two kinds of file, both read with `weights_only=True` (tensors and plain data, never code):

- a model file (`save_model` / `load_model`): {"format": "minillm.model", config, weights,
  tokenizer, extra}. Self-contained: `load_model` rebuilds the module tree from the config,
  including MoE layers and their plan transforms (see `minillm.moe.moe_spec`).
- a training checkpoint `ckpt_<step>.pt` (`training_state` / `save_training_checkpoint`): the
  model, AdamW's state, every rank's data-loader position and RNG states, the step, the training
  and model configs, the tokenizer and the callbacks' states, so that a resumed run continues
  exactly. Under expert parallelism the experts are gathered under their global index, so a
  checkpoint does not depend on the layout it was written with.

Every file is written through `minillm.fileio.atomic_write`: a crash mid-write never leaves a
damaged checkpoint. On resume, damaged checkpoints are skipped (and moved aside) and the newest one
that loads is used (`latest_checkpoint`).

The functions that take a `trainer` read and set the state of a `minillm.train.Trainer`; the
trainer's loop does not need to know how its state is stored.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from . import expert_parallel
from .errors import UserError
from .fileio import atomic_write, write_text
from .model import GPT, ModelConfig
from .tokenizer import Tokenizer, tokenizer_from_dict

MODEL_FORMAT = "minillm.model"
CHECKPOINT_FORMAT = "minillm.train"


# --- reading any minillm file ----------------------------------------------------------------------

def load_torch_file(path, map_location="cpu", expected: str = "a minillm checkpoint", mmap=False):
    """`torch.load` with `weights_only=True` (tensors and plain data, never code). `mmap` maps zip
    files; pre-zip files (`_use_new_zipfile_serialization=False`) cannot be mapped and are read
    whole. A file that is not such a checkpoint is a `UserError` naming the file and `expected`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found (expected {expected})")
    with open(path, "rb") as f:
        start = f.read(4)
    zipped = start == b"PK\x03\x04"  # torch.save's zip archive
    pickled = start[:1] == b"\x80"  # a pickle's protocol opcode starts pre-zip files
    if not zipped and not pickled:
        raise UserError(f"{path}: not a PyTorch file (neither a zip archive nor a pickle); "
                        f"expected {expected}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and zipped)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds Python objects other than tensors and plain data, which "
                        f"minillm does not load; expected {expected}") from None
    except (RuntimeError, EOFError, KeyError, ValueError) as e:
        reason = str(e).split(". ")[0] or type(e).__name__
        raise UserError(f"{path}: a damaged or truncated PyTorch file ({reason}); "
                        f"expected {expected}") from None


def save_torch_file(path, obj) -> None:
    """`torch.save`, atomically."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# --- model files ------------------------------------------------------------------------------------

def save_model(path, model: GPT, tokenizer: Tokenizer | None = None, extra: dict | None = None) -> None:
    """Weights, config and (optionally) the tokenizer in one file, written atomically."""
    save_torch_file(path, {
        "format": MODEL_FORMAT, "version": 1, "config": model.describe().to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "tokenizer": tokenizer.to_dict() if tokenizer is not None else None,
        "extra": extra or {}})


def load_model(path, device="cpu"):
    """(model, tokenizer or None, extra) from a file written by `save_model`, or from a training
    checkpoint (`ckpt_*.pt`)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    what = "a minillm model (save_model) or training checkpoint (ckpt_*.pt)"
    blob = load_torch_file(path, map_location=device, expected=what)
    fmt = blob.get("format") if isinstance(blob, dict) else None
    if fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise UserError(f"{path}: a PyTorch file, but not {what}")
    config = blob["config"] if fmt == MODEL_FORMAT else blob["model_config"]
    model = GPT(ModelConfig(**config)).to(device)
    model.load_state_dict(blob["model"])
    tok = blob.get("tokenizer")
    return model, (tokenizer_from_dict(tok, source=str(path)) if tok else None), blob.get("extra", {})


# --- training checkpoints in a run folder ------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves only a `.tmp` file, never a damaged checkpoint."""
    save_torch_file(path, state)


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name `ckpt_<step>.pt` (sorted by this, not by the name's text)."""
    return int(path.stem.split("_", 1)[1])


def checkpoints(out_dir: Path) -> list[Path]:
    """The `ckpt_<step>.pt` files of `out_dir`, oldest first."""
    return sorted((p for p in Path(out_dir).glob("ckpt_*.pt") if p.stem[5:].isdigit()),
                  key=checkpoint_step)


def latest_checkpoint(out_dir: Path, quiet: bool = False
                      ) -> tuple[Path | None, dict | None, list[str]]:
    """(path, state, problems): the newest checkpoint in `out_dir` that loads, skipping damaged
    ones (each named in `problems`, and printed unless `quiet`); (None, None, problems) if none.
    Memory-mapped: tensors are read when used."""
    problems = []
    for path in reversed(checkpoints(out_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a damaged file: fall back to the one before it
            problems.append(f"{path.name}: unreadable ({type(e).__name__}: damaged, truncated or "
                            "not a torch file)")
        else:
            if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
                return path, state, problems
            problems.append(f"{path.name}: not a minillm training checkpoint")
        if not quiet:
            print(f"skipping unreadable checkpoint {problems[-1]}")
    return None, None, problems


def earlier_run(out_dir: Path) -> list[Path]:
    """The files of an earlier run in `out_dir`: its checkpoints and metrics."""
    return checkpoints(out_dir) + sorted(Path(out_dir).glob("metrics.jsonl"))


def prepare_out_dir(out_dir: Path, dist, resume: bool, overwrite: bool) -> None:
    """A fresh run never mixes with an earlier one in the same out_dir: refuse, unless resuming
    (continue it) or overwriting (delete its checkpoints and metrics; every rank must call)."""
    earlier = earlier_run(out_dir)
    if not earlier or resume:
        return
    if not overwrite:
        raise UserError(f"{out_dir} holds an earlier run ({earlier[0].name}); pass "
                        "--resume true to continue it or --overwrite true to start over")
    if dist.enabled:
        torch_dist.barrier()  # every rank has looked before rank 0 deletes
    if dist.is_main:
        for path in earlier:
            path.unlink()
    if dist.enabled:
        torch_dist.barrier()


# --- resuming ----------------------------------------------------------------------------------------

# Fields of a TrainConfig a resumed run may change (logged when they do). The others fix the model,
# the data stream or the random state, so that a changed value could not continue the saved run.
CHANGEABLE_ON_RESUME = frozenset({
    "out_dir", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction",
    "weight_decay", "beta1", "beta2", "grad_clip", "log_interval", "eval_interval", "eval_batches",
    "ckpt_interval", "keep_checkpoints", "resume", "overwrite", "device", "compile", "fsdp",
    "activation_checkpointing", "max_skipped_steps", "progress", "expert_parallel"})


def _flag(name: str) -> str:
    return name.replace("_", "-")


def resume_config(cfg, given: set[str]):
    """The config a script should resume with: the latest checkpoint's training config, with the
    fields the user set explicitly (`given`, e.g. from `cli.given_fields`) laid over it. Without a
    readable checkpoint, `cfg` itself (the Trainer then says why it cannot resume)."""
    _, state, _ = latest_checkpoint(Path(cfg.out_dir), quiet=True)
    if state is None:
        return cfg
    saved = {f.name: state["train_config"][f.name] for f in dataclasses.fields(cfg)
             if f.name in state["train_config"]}
    saved.update(resume=True, overwrite=False)
    return type(cfg)(**{**saved, **{name: getattr(cfg, name) for name in given}})


def check_resume_config(cfg, path: Path, saved: dict, verbose: bool) -> None:
    """Fields that fix the model, the data stream or the random state must match the
    checkpoint's; the others (`CHANGEABLE_ON_RESUME`) may change, and each change is printed."""
    for f in dataclasses.fields(cfg):
        if f.name not in saved:
            continue
        mine, theirs = getattr(cfg, f.name), saved[f.name]
        if mine == theirs:
            continue
        if f.name not in CHANGEABLE_ON_RESUME:
            raise UserError(f"--{_flag(f.name)} {mine!r} contradicts the run being resumed "
                            f"({path} has {theirs!r}); drop the flag, or start a new run in "
                            "another --out-dir")
        if verbose and f.name not in ("resume", "overwrite", "progress", "out_dir"):
            print(f"resume: --{_flag(f.name)} changes from {theirs!r} to {mine!r}")


def find_resume_state(out_dir: Path, dist) -> tuple[Path | None, dict | None]:
    """The newest good checkpoint (each rank reads the file: multi-node runs need a shared file
    system for `out_dir`). An out_dir with an earlier run but no loadable checkpoint is an
    error that touches nothing: starting over must be asked for with --overwrite."""
    path, state, problems = latest_checkpoint(out_dir, quiet=True)
    if dist.enabled:  # every rank resumes rank 0's choice, or all stop alike
        choice = [str(path) if path is not None else None]
        torch_dist.broadcast_object_list(choice, src=0)
        if choice[0] != (str(path) if path is not None else None):
            if choice[0] is None:
                path, state = None, None
            else:
                path = Path(choice[0])
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if path is None:
        if earlier_run(out_dir):
            found = "; ".join(problems) if problems else "no checkpoint, only metrics.jsonl"
            raise UserError(f"--resume: {out_dir} holds an earlier run but no checkpoint that "
                            f"loads ({found}); nothing was changed. Pass --overwrite true "
                            "(without --resume) to start over")
        if dist.is_main:
            print(f"--resume: no checkpoint in {out_dir}, starting from step 0")
        return None, None
    if dist.is_main:
        for problem in problems:
            print(f"skipping unreadable checkpoint {problem}")
        # Damaged checkpoints newer than the one resumed would otherwise count as "newest"
        # when old ones are pruned: move them aside (kept, renamed, not deleted).
        for newer in checkpoints(out_dir):
            if checkpoint_step(newer) > checkpoint_step(path):
                newer.rename(newer.with_name(newer.name + ".damaged"))
                print(f"moved the unreadable {newer.name} aside to {newer.name}.damaged")
    return path, state


def truncate_metrics(out_dir: Path, step: int) -> None:
    """Drop metrics logged after `step`, the checkpoint resumed from (they will be logged again)."""
    path = Path(out_dir) / "metrics.jsonl"
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line torn by a crash mid-write
    write_text(path, "".join(line + "\n" for line in keep))


# --- a trainer's state ---------------------------------------------------------------------------------

def per_rank(value, dist) -> list:
    """`value` of every rank, in rank order (loader positions and RNG states differ per rank)."""
    if not dist.enabled:
        return [value]
    values = [None] * dist.world_size
    torch_dist.all_gather_object(values, value)
    return values


def callback_states(callbacks) -> dict:
    """{key: state} of every callback with `state_dict()` (key: its `state_key` or class name),
    saved in the checkpoint so that a method's schedule resumes exactly."""
    return {getattr(cb, "state_key", type(cb).__name__): cb.state_dict()
            for cb in callbacks if hasattr(cb, "state_dict")}


def training_state(trainer) -> dict:
    """The full training state of `trainer`. Under FSDP this is a collective: every rank must
    call it; the full tensors end up on rank 0 (on the CPU)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if trainer.sharded:  # every rank keeps its own experts until they are gathered
        options = StateDictOptions(full_state_dict=True)
    model = get_model_state_dict(trainer.model, options=options)
    optimizer = get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)
    if trainer.sharded:  # checkpoints hold experts under their global index, whatever the layout
        names = set(trainer.sharded)
        model = expert_parallel.gather_experts(model, names, trainer.ep_group)
        optimizer["state"] = expert_parallel.gather_optimizer_experts(
            optimizer["state"], names, trainer.ep_group)
    dist = trainer.dist
    state = {"format": CHECKPOINT_FORMAT, "step": trainer.step,
             "skipped_steps": int(trainer.skipped_steps),
             "model": model, "optimizer": optimizer,
             "loader": per_rank(trainer.loader.state_dict(), dist),
             "rng": per_rank(torch.get_rng_state(), dist),
             "train_config": dataclasses.asdict(trainer.cfg),
             "model_config": trainer.model.describe().to_dict(),
             "tokenizer": trainer.tokenizer.to_dict(),
             "callbacks": callback_states(trainer.callbacks)}  # e.g. SSD's phase
    if trainer.device.type == "cuda":
        state["cuda_rng"] = per_rank(torch.cuda.get_rng_state(trainer.device), dist)
    return state


def save_training_checkpoint(trainer) -> Path:
    """Write `ckpt_<step>.pt` of `trainer` atomically (rank 0; every rank must call) and keep the
    newest `keep_checkpoints`, never deleting a newer file or this one."""
    out_dir, step = trainer.out_dir, trainer.step
    path = out_dir / f"ckpt_{step:07d}.pt"
    state = training_state(trainer)  # on every rank: gathering a sharded model is collective
    if trainer.dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, state)
        keep = trainer.cfg.keep_checkpoints
        if keep > 0:
            older = [p for p in checkpoints(out_dir) if checkpoint_step(p) < step]
            for old in older[:max(len(older) - keep + 1, 0)]:
                old.unlink()
    if trainer.dist.enabled:
        torch_dist.barrier()
    return path


def load_training_state(trainer, path: Path, state: dict) -> None:
    """Set `trainer` (built with the checkpoint's model config) to the state in `path`."""
    cfg, dist = trainer.cfg, trainer.dist
    options = StateDictOptions(full_state_dict=True)
    model, optimizer = state["model"], state["optimizer"]
    if trainer.sharded:  # this rank's share of the experts, from their global indices
        names = set(trainer.sharded)
        rank, size = torch_dist.get_rank(trainer.ep_group), cfg.expert_parallel
        model = expert_parallel.shard_experts(model, names, rank, size)
        optimizer = {**optimizer, "state": expert_parallel.shard_optimizer_experts(
            optimizer["state"], names, rank, size)}
    set_model_state_dict(trainer.model, model, options=options)
    set_optimizer_state_dict(trainer.model, trainer.optimizer, optimizer, options=options)
    for group in trainer.optimizer.param_groups:  # settings changed on resume take effect
        if not group.get("own_lr"):
            group["betas"] = (cfg.beta1, cfg.beta2)
            if group.get("decayed"):
                group["weight_decay"] = cfg.weight_decay
    if len(state["loader"]) != dist.world_size:
        raise UserError(f"{path} was written by {len(state['loader'])} process(es); resuming "
                        f"it exactly needs the same number, not {dist.world_size}")
    trainer.loader.load_state_dict(state["loader"][dist.rank])
    torch.set_rng_state(state["rng"][dist.rank])
    if "cuda_rng" in state and trainer.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"][dist.rank], trainer.device)
    trainer.step = state["step"]
    saved_callbacks = state.get("callbacks", {})
    for cb in trainer.callbacks:
        if hasattr(cb, "load_state_dict"):
            key = getattr(cb, "state_key", type(cb).__name__)
            if key not in saved_callbacks:
                raise UserError(f"{path} holds no state of the {key} callback: it was written "
                                "by a run without it, and cannot be resumed with it")
            cb.load_state_dict(saved_callbacks[key], trainer)
    trainer.skipped_steps.fill_(state.get("skipped_steps", 0))
    trainer.checkpoint_path = path
    if dist.is_main:
        truncate_metrics(trainer.out_dir, trainer.step)
        print(f"resumed from {path} at step {trainer.step}")


__all__ = ["MODEL_FORMAT", "CHECKPOINT_FORMAT", "CHANGEABLE_ON_RESUME", "load_torch_file",
           "save_torch_file", "save_model", "load_model", "save_checkpoint", "checkpoint_step",
           "checkpoints", "latest_checkpoint", "earlier_run", "prepare_out_dir", "resume_config", "check_resume_config",
           "find_resume_state", "truncate_metrics", "training_state", "save_training_checkpoint",
           "load_training_state"]
