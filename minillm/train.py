"""The training loop: AdamW, warmup + cosine / warmup-stable-decay, accumulation, clipping, DDP
(with MoE experts optionally sharded over ranks: `--expert-parallel`), exact resume from atomic
checkpoints, and callbacks for methods that act between steps.

Read `Trainer.train` top to bottom: one step is `grad_accum / world_size` micro-batches per rank
(so the global batch does not depend on the number of processes), the model's loss plus its
auxiliary losses, gradient clipping, one optimizer step. Methods plug in through callbacks
(`on_step_start`, `on_step_end`, `on_eval`, `on_checkpoint`) instead of copying the loop.

The loop never waits for the GPU except on log, eval and checkpoint steps (as nanoGPT): losses stay
on the device until a log step reads them all at once. A step whose loss or gradient norm is not
finite is skipped on the device (fused AdamW's `found_inf`: no update, no moment change, no step
count), counted, and the run stops once more than `max_skipped_steps` were skipped; a checkpoint is
never written from a non-finite state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import expert_parallel
from .data import DataError, MixtureLoader, TokenDataset, TokenLoader, eval_batches, parse_domains
from .distributed import DistInfo
from .errors import UserError
from .model import GPT, IGNORE_INDEX, ModelConfig, load_model, preset
from .moe import MoE, MoEConfig, replace_ffns_with_moe
from .tokenizer import load_tokenizer

CHECKPOINT_FORMAT = "minillm.train"
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from NVIDIA's data sheets; matched against
# torch.cuda.get_device_name() in this order. MFU is reported only for GPUs listed here.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_flops_of(torch.cuda.get_device_name(device))


def peak_flops_of(name: str) -> float | None:
    """The table's peak for a device name, matching whole words (an "L40" is not an "L4")."""
    return next((peak for key, peak in PEAK_BF16_FLOPS
                 if re.search(rf"(^|\s){re.escape(key)}(\s|$)", name)), None)


@dataclass
class TrainConfig:
    data: list[str] = field(default_factory=lambda: ["data/default"], metadata={
        "help": "dataset folders from prepare_data; several domains as NAME=PATH:WEIGHT"})
    out_dir: str = field(default="out/run", metadata={"help": "checkpoints and metrics.jsonl"})
    preset: str = field(default="tiny-gpt", metadata={"help": "model preset (minillm.model.PRESETS)"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from these weights instead of a preset: a minillm model / training "
                "checkpoint, or a Hugging Face model folder (continued pretraining)"})
    n_layer: int | None = field(default=None, metadata={"help": "override the preset's depth"})
    n_head: int | None = field(default=None, metadata={"help": "override the preset's heads"})
    n_embd: int | None = field(default=None, metadata={"help": "override the preset's width"})
    block_size: int = 128
    dropout: float = 0.0
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step over all processes"})
    max_steps: int = 200
    lr: float = 1e-3
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a share of lr"})
    warmup_steps: int = 20
    schedule: str = field(default="cosine", metadata={"help": "cosine or wsd (warmup-stable-decay)"})
    decay_fraction: float = field(default=0.2, metadata={"help": "wsd: share of steps spent decaying"})
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm; 0 disables"})
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 8
    ckpt_interval: int = 100
    keep_checkpoints: int = field(default=2, metadata={"help": "newest checkpoints kept; 0: all"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest good checkpoint"})
    overwrite: bool = field(default=False, metadata={
        "help": "start over in an out_dir that holds an earlier run (deletes its checkpoints)"})
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    fsdp: bool = field(default=False, metadata={"help": "shard with FSDP2 instead of DDP"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute block activations in backward (saves memory)"})
    moe_experts: int = field(default=0, metadata={
        "help": "experts per MoE layer; 0: a dense model (MoE layers replace FFNs of --moe-layers)"})
    moe_top_k: int = 2
    moe_capacity_factor: float = field(default=1.25, metadata={"help": "0: dropless"})
    moe_expert_hidden: int | None = field(default=None, metadata={
        "help": "hidden units per expert (default: the dense FFN's)"})
    moe_layers: list[int] = field(default_factory=list, metadata={
        "help": "layers whose FFN becomes an MoE layer (default: every other, from layer 1)"})
    moe_rectify: list[str] = field(default_factory=list, metadata={
        "help": "Rectify-Router plan transforms: intra and / or fill (scripts/pretrain.py)"})
    moe_devices: int = field(default=1, metadata={
        "help": "devices Intra-GPU Rectification assumes the experts are spread over"})
    expert_parallel: int = field(default=1, metadata={
        "help": "under torchrun: shard every MoE layer's experts over groups of N ranks (the "
                "groups data-parallel); 1: every rank holds every expert"})
    max_skipped_steps: int = field(default=10, metadata={
        "help": "steps with a non-finite loss or gradient norm that are skipped (no update) before "
                "the run stops; 0 stops at the first"})
    progress: bool = True

    def validate(self) -> None:
        """Raise `UserError` naming the first flag out of range, before anything is written."""
        positive = ("block_size", "batch_size", "grad_accum", "max_steps", "log_interval",
                    "eval_batches")
        non_negative = ("warmup_steps", "eval_interval", "ckpt_interval", "keep_checkpoints",
                        "grad_clip", "weight_decay", "max_skipped_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise UserError(f"--{_flag(name)} must be 0 or more, got {getattr(self, name)}")
        for name in ("n_layer", "n_head", "n_embd"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{_flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.schedule not in ("cosine", "wsd"):
            raise UserError(f"--schedule must be cosine or wsd, got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        for name in ("min_lr_ratio", "decay_fraction", "beta1", "beta2"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"--{_flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise UserError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.moe_experts < 0 or (self.moe_experts and not 1 <= self.moe_top_k <= self.moe_experts):
            raise UserError(f"--moe-top-k {self.moe_top_k} with --moe-experts {self.moe_experts}: "
                            "expected 1 <= top-k <= experts")
        for name in ("grad_clip", "weight_decay", "moe_capacity_factor"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"--{_flag(name)} must be a finite number, got {getattr(self, name)}")
        if self.moe_devices < 1 or (self.moe_expert_hidden is not None and self.moe_expert_hidden < 1):
            raise UserError("--moe-devices and --moe-expert-hidden must be at least 1")
        if (self.moe_layers or self.moe_rectify) and not self.moe_experts:
            raise UserError("--moe-layers / --moe-rectify need --moe-experts N (N > 0)")
        if self.moe_capacity_factor < 0:
            raise UserError(f"--moe-capacity-factor must be 0 (dropless) or more, got "
                            f"{self.moe_capacity_factor}")
        unknown = sorted(set(self.moe_rectify) - {"intra", "fill"})
        if unknown:
            raise UserError(f"--moe-rectify {' '.join(unknown)}: expected intra and / or fill")
        if self.moe_experts and self.moe_experts % self.moe_devices:
            raise UserError(f"--moe-experts {self.moe_experts} do not split over --moe-devices "
                            f"{self.moe_devices}")
        if self.expert_parallel < 1:
            raise UserError(f"--expert-parallel must be at least 1, got {self.expert_parallel}")
        if self.expert_parallel > 1:
            if self.fsdp:
                raise UserError("--fsdp with --expert-parallel: FSDP together with expert "
                                "parallelism is not supported yet; drop --fsdp (DDP is used)")
            if self.moe_experts % self.expert_parallel:
                raise UserError(f"--moe-experts {self.moe_experts} do not split over "
                                f"--expert-parallel {self.expert_parallel} ranks")
            if self.moe_devices not in (1, self.expert_parallel):
                raise UserError(f"--moe-devices {self.moe_devices} contradicts --expert-parallel "
                                f"{self.expert_parallel}: under expert parallelism the experts' "
                                "devices are the ranks; drop --moe-devices")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other: pass one of them")
        if not self.data:
            raise UserError("--data: pass at least one dataset folder")


def _flag(name: str) -> str:
    return name.replace("_", "-")


# Fields a resumed run may change (logged when they do). The others fix the model, the data stream
# or the random state, so that a changed value could not continue the saved run.
CHANGEABLE_ON_RESUME = frozenset({
    "out_dir", "max_steps", "lr", "min_lr_ratio", "warmup_steps", "schedule", "decay_fraction",
    "weight_decay", "beta1", "beta2", "grad_clip", "log_interval", "eval_interval", "eval_batches",
    "ckpt_interval", "keep_checkpoints", "resume", "overwrite", "device", "compile", "fsdp",
    "activation_checkpointing", "max_skipped_steps", "progress", "expert_parallel"})


def resume_config(cfg: TrainConfig, given: set[str]) -> TrainConfig:
    """The config a script should resume with: the latest checkpoint's training config, with the
    fields the user set explicitly (`given`, e.g. from `cli.given_fields`) laid over it. Without a
    readable checkpoint, `cfg` itself (the Trainer then decides whether starting is safe)."""
    _, state, _ = latest_checkpoint(Path(cfg.out_dir), quiet=True)
    if state is None:
        return cfg
    saved = {f.name: state["train_config"][f.name] for f in dataclasses.fields(TrainConfig)
             if f.name in state["train_config"]}
    saved.update(resume=True, overwrite=False)
    return TrainConfig(**{**saved, **{name: getattr(cfg, name) for name in given}})


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step`: linear warmup, then cosine decay to min_lr_ratio * lr, or (wsd) a
    constant plateau followed by a linear decay over the last `decay_fraction` of the steps."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    if cfg.schedule == "wsd":
        decay_start = cfg.max_steps - int(cfg.decay_fraction * cfg.max_steps)
        if step < decay_start:
            return cfg.lr
        progress = (step - decay_start) / max(cfg.max_steps - decay_start, 1)
        return cfg.lr + (min_lr - cfg.lr) * min(progress, 1.0)
    raise UserError(f"--schedule must be cosine or wsd, got {cfg.schedule!r}")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW. Matrices (dim >= 2: linear weights, embeddings) get weight decay; biases and norm
    gains (dim 1) do not: shrinking them towards 0 only fights the normalisation. Fused (one
    kernel for all parameters, on the CPU too), which also lets the trainer skip a non-finite step
    on the device through the optimizer's `found_inf` tensor.

    A submodule that defines `optimizer_groups(cfg) -> list[dict]` claims its own parameters: its
    groups (no decay, `maximize=True` for a Lagrange multiplier, ...) are used as given; a group
    with `own_lr: True` keeps its `lr` instead of following the schedule.
    Groups follow module order, so a checkpoint's optimizer state maps back to the same groups."""
    groups, claimed = [], set()
    for module in model.modules():
        if module is not model and hasattr(module, "optimizer_groups"):
            for group in module.optimizer_groups(cfg):
                groups.append(group)
                claimed |= {id(p) for p in group["params"]}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay,
               "decayed": True},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}] + groups
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


# --- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves only a `.tmp` file, never a damaged checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint's name `ckpt_<step>.pt` (sorted by this, not by the name's text)."""
    return int(path.stem.split("_", 1)[1])


def checkpoints(out_dir: Path) -> list[Path]:
    """The `ckpt_<step>.pt` files of `out_dir`, oldest first."""
    return sorted((p for p in out_dir.glob("ckpt_*.pt") if p.stem[5:].isdigit()), key=checkpoint_step)


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


def _check_dataset_folder(path: Path) -> None:
    """A dataset folder made by prepare_data.py, or a one-line error that says what to do."""
    if not path.exists():
        raise DataError(f"data folder {path} does not exist: make it with scripts/prepare_data.py "
                        "(or pass --data PATH)")
    if path.is_dir() and not (path / "meta.json").is_file():
        raw = [p.name for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".json", ".md")]
        hint = (f"it holds raw text ({', '.join(sorted(raw)[:3])}): run scripts/prepare_data.py on "
                "it first" if raw else "run scripts/prepare_data.py first")
        raise DataError(f"{path} is not a prepared dataset (no meta.json): {hint}")
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path}: no tokenizer.json beside the shards (was prepare_data.py "
                        "interrupted?)")


# --- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Builds data, model and optimizer from a `TrainConfig` and runs the loop.

    `self.model` is the plain `GPT` (sharded in place under FSDP2); `self.wrapped` is what the loop
    calls (DDP and / or torch.compile around it). `self.loader` is a `MixtureLoader` over the
    domains of `cfg.data` (one domain is a mixture of one); callbacks may change its weights.
    `model_transform` (GPT -> GPT) runs on the fresh model before the optimizer is built: methods
    use it to swap modules, e.g. dense FFNs for MoE layers.

    `data_source` replaces the loaders built from `cfg.data`: any object with `next_batch()` ->
    (x, y, forward kwargs or anything else), `state_dict()` / `load_state_dict()` (saved per rank
    for exact resume), `names` and, for evaluation, `eval_batches(max_windows, rank, world_size)`
    (see `minillm.sft.PackedLoader`); `tokenizer` must then be given. The loss of a micro-batch is
    the mean over its target tokens (targets of -100 are ignored).

    Everything the flags and data can get wrong is checked here, before anything is written. With
    `resume`, the model is rebuilt from the checkpoint's own config; a field of `cfg` outside
    `CHANGEABLE_ON_RESUME` that differs from the checkpoint's is an error."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, callbacks: list | None = None,
                 model_config: ModelConfig | None = None, model_transform=None,
                 data_source=None, tokenizer=None, plan_transforms: list | None = None):
        cfg.validate()
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks or [])
        if cfg.grad_accum % dist.world_size:
            raise UserError(f"--grad-accum {cfg.grad_accum} must be a multiple of the number of "
                            f"processes {dist.world_size}")
        self.accum = cfg.grad_accum // dist.world_size
        self.out_dir = Path(cfg.out_dir)
        self.device = dist.device
        self.data_source = data_source
        if data_source is None:
            self._build_data()
        else:  # batches from the caller, e.g. minillm.sft.PackedLoader; cfg.data is not read
            if tokenizer is None:
                raise UserError("Trainer(data_source=...) needs the tokenizer of its tokens")
            if cfg.eval_interval and not hasattr(data_source, "eval_batches"):
                raise UserError(f"--eval-interval {cfg.eval_interval}: the data source has no "
                                "eval_batches; pass --eval-interval 0")
            for name, mine in (("block_size", cfg.block_size), ("rank", dist.rank),
                               ("world_size", dist.world_size)):
                theirs = getattr(data_source, name, mine)
                if theirs != mine:
                    raise UserError(f"the data source has {name} {theirs}, the run {mine}: build it "
                                    f"with the run's {name}")
            self.loader, self.tokenizer, self.val = data_source, tokenizer, {}
            if cfg.eval_interval:  # one validation batch now, not a crash at the first evaluation
                next(iter(data_source.eval_batches(1, 0, 1)))
        resume_path, resume_state = self._find_resume_state() if cfg.resume else (None, None)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if resume_state is not None:  # the checkpoint's own model, whatever the flags say
            self._check_resume_config(resume_path, resume_state["train_config"])
            model_config = ModelConfig(**resume_state["model_config"])
            self.model = GPT(model_config).to(self.device)
        elif cfg.init_from:
            self.model = self._load_initial_model(cfg.init_from).float().to(self.device)
        else:
            if model_config is None:
                sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
                model_config = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size,
                                      block_size=cfg.block_size, dropout=cfg.dropout, **sizes)
            self.model = GPT(model_config).to(self.device)
        self._check_model_fits_data()
        if cfg.moe_experts and not any(isinstance(b.ffn, MoE) for b in self.model.blocks):
            self._make_moe(plan_transforms)
        self._check_out_dir()  # the first thing that may write (delete, with --overwrite)
        if model_transform is not None:  # e.g. replace FFNs by MoE layers, before the optimizer
            self.model = model_transform(self.model).to(self.device)
        if dist.rank:  # identical weights above; from here each rank draws its own noise (dropout)
            torch.manual_seed(cfg.seed + dist.rank)
        self._shard_experts()  # sets self.sharded ({name: expert parameter}; empty without EP)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.fsdp:
            # Shard every block, then the root (embeddings, final norm, head): each block's
            # parameters are gathered just before it runs and freed after.
            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step = 0
        # Non-finite steps skipped so far, and the latest one; device tensors, read on log steps.
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=self.device)
        self.last_skipped_step = torch.zeros((), dtype=torch.long, device=self.device)
        self.checkpoint_path = None
        if resume_state is not None:
            self._load_state(resume_path, resume_state)
        self.wrapped = self.model
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        if dist.enabled and not cfg.fsdp:
            if self.sharded:  # experts differ between ranks: DDP must not broadcast or average them
                sharded = {id(p) for p in self.sharded.values()}
                DDP._set_params_and_buffers_to_ignore_for_model(
                    self.wrapped, [n for n, p in self.wrapped.named_parameters() if id(p) in sharded])
            self.wrapped = DDP(self.wrapped, device_ids=[dist.local_rank] if self.device.type == "cuda"
                               else None)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.peak_flops = peak_flops(self.device)

    def _make_moe(self, plan_transforms: list | None) -> None:
        """MoE layers by flags. Plan transforms are objects (`plan_transforms`): the library does
        not import methods; scripts/pretrain.py turns --moe-rectify names into them."""
        cfg, model_cfg = self.cfg, self.model.config
        if cfg.moe_rectify and plan_transforms is None:
            raise UserError(f"--moe-rectify {' '.join(cfg.moe_rectify)} needs the transforms: "
                            "pass Trainer(plan_transforms=...) (scripts/pretrain.py does)")
        layers = cfg.moe_layers or list(range(1, model_cfg.n_layer, 2))
        bad = [i for i in layers if not 0 <= i < model_cfg.n_layer]
        if bad or not layers:
            raise UserError(f"--moe-layers {layers}: the model has layers 0 to {model_cfg.n_layer - 1}")
        moe_cfg = MoEConfig(num_experts=cfg.moe_experts, top_k=cfg.moe_top_k,
                            expert_hidden=cfg.moe_expert_hidden or model_cfg.ffn_hidden,
                            activation=model_cfg.activation, capacity_factor=cfg.moe_capacity_factor)
        replace_ffns_with_moe(self.model, moe_cfg, layers,
                              plan_transforms=list(plan_transforms or []))

    def _shard_experts(self) -> None:
        """Expert parallelism (--expert-parallel N): every MoE layer keeps this rank's share of its
        experts, sharded over groups of N consecutive ranks; ranks r, r + N, ... hold the same
        experts and average their gradients (`expert_parallel.reduce_expert_gradients`)."""
        self.sharded: dict = {}
        self.ep_group = self.expert_dp_group = None
        N = self.cfg.expert_parallel
        if N == 1:
            return
        if self.dist.world_size % N or self.dist.world_size < N:
            raise UserError(f"--expert-parallel {N}: the {self.dist.world_size} process(es) do not "
                            f"split into groups of {N} (launch with torchrun --nproc_per_node)")
        layers = [b.ffn for b in self.model.blocks if isinstance(b.ffn, MoE)]
        if not layers:
            raise UserError(f"--expert-parallel {N}: the model has no MoE layer (pass --moe-experts)")
        for moe in layers:
            if moe.cfg.num_experts % N:
                raise UserError(f"--expert-parallel {N}: an MoE layer has {moe.cfg.num_experts} "
                                "experts, which do not split over the group")
        self.ep_group, self.expert_dp_group = expert_parallel.make_groups(N)
        for moe in layers:
            moe.shard_experts(self.ep_group)
        self.sharded = expert_parallel.sharded_parameters(self.model)

    def _load_initial_model(self, source: str) -> GPT:
        """Weights to continue from; the data must have been tokenized with the model's tokenizer."""
        if Path(source).is_dir():
            from .hf import load_hf
            model = load_hf(source)
        else:
            model = load_model(source)[0]
        return model.train()

    def _check_model_fits_data(self) -> None:
        config, source = self.model.config, self.cfg.init_from or f"--preset {self.cfg.preset}"
        if self.tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the data's tokenizer has {self.tokenizer.vocab_size} ids but the model "
                            f"({source}) has {config.vocab_size} embeddings: prepare the data with "
                            "the model's tokenizer (prepare_data.py --tokenizer)")
        if self.cfg.block_size > config.block_size and config.position == "learned":
            raise UserError(f"--block-size {self.cfg.block_size} exceeds the {config.block_size} "
                            f"positions of the model ({source})")

    def _build_data(self) -> None:
        """Loaders for every domain, checked up front: a dataset folder made by prepare_data.py,
        one tokenizer for all domains, shards within its vocabulary, at least one batch of
        training windows and (when evaluating) one validation window."""
        cfg, dist = self.cfg, self.dist
        domains = parse_domains(cfg.data)
        self.tokenizer = None
        loaders, weights, self.val = {}, {}, {}
        for name, (path, weight) in domains.items():
            _check_dataset_folder(Path(path))
            tok = load_tokenizer(Path(path) / "tokenizer.json")
            if self.tokenizer is None:
                self.tokenizer, first = tok, path
            elif tok.to_dict() != self.tokenizer.to_dict():
                raise UserError(f"{path} was tokenized with another tokenizer than {first}: "
                                "all domains must share one")
            loaders[name] = TokenLoader(TokenDataset(path, "train", vocab_size=tok.vocab_size),
                                        cfg.block_size, cfg.batch_size, seed=cfg.seed,
                                        rank=dist.rank, world_size=dist.world_size, device=self.device)
            if loaders[name].windows_per_rank < cfg.batch_size:
                raise DataError(f"{path}: the train split gives {loaders[name].windows_per_rank} "
                                f"window(s) of {cfg.block_size + 1} tokens per process, fewer than "
                                f"--batch-size {cfg.batch_size}")
            if cfg.eval_interval:
                try:
                    self.val[name] = TokenDataset(path, "val", vocab_size=tok.vocab_size)
                    next(eval_batches(self.val[name], cfg.block_size, 1, max_windows=1,
                                      rank=0, world_size=1))
                except DataError as e:
                    raise DataError(f"{e}; --eval-interval {cfg.eval_interval} needs a validation "
                                    "split: prepare the data with --val-fraction > 0, or pass "
                                    "--eval-interval 0") from None
            weights[name] = weight
        self.loader = MixtureLoader(loaders, weights, cfg.batch_size, seed=cfg.seed)

    def _callback(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    # --- checkpoints ---
    def _per_rank(self, value) -> list:
        """`value` of every rank, in rank order (loader positions and RNG states differ per rank)."""
        if not self.dist.enabled:
            return [value]
        values = [None] * self.dist.world_size
        torch_dist.all_gather_object(values, value)
        return values

    def state_dict(self) -> dict:
        """The full training state. Under FSDP this is a collective: every rank must call it;
        the full tensors end up on rank 0 (on the CPU)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if self.sharded:  # every rank keeps its own experts until they are gathered
            options = StateDictOptions(full_state_dict=True)
        model = get_model_state_dict(self.model, options=options)
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=options)
        if self.sharded:  # checkpoints hold experts under their global index, whatever the layout
            names = set(self.sharded)
            model = expert_parallel.gather_experts(model, names, self.ep_group)
            optimizer["state"] = expert_parallel.gather_optimizer_experts(
                optimizer["state"], names, self.ep_group)
        state = {"format": CHECKPOINT_FORMAT, "step": self.step,
                 "skipped_steps": int(self.skipped_steps),
                 "model": model, "optimizer": optimizer,
                 "loader": self._per_rank(self.loader.state_dict()),
                 "rng": self._per_rank(torch.get_rng_state()),
                 "train_config": dataclasses.asdict(self.cfg),
                 "model_config": self.model.describe().to_dict(), "tokenizer": self.tokenizer.to_dict()}
        state["callbacks"] = self._callback_states()  # e.g. SSD's phase (see "swapping modules")
        if self.device.type == "cuda":
            state["cuda_rng"] = self._per_rank(torch.cuda.get_rng_state(self.device))
        return state

    def _parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (one reduction; local shards under FSDP)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in local]).all().to(torch.int32)
        if self.dist.enabled:
            torch_dist.all_reduce(finite, op=torch_dist.ReduceOp.MIN)
        return bool(finite)

    def save(self) -> Path:
        """Write `ckpt_<step>.pt` atomically (rank 0) and keep the newest `keep_checkpoints`. Never
        from a non-finite state: the skipped-step limit and the parameters are checked first."""
        self._check_skipped_steps()
        if not self._parameters_finite():
            raise FloatingPointError(f"a parameter is not finite at step {self.step}; stopping "
                                     f"without saving. {self._last_good()}")
        path = self.out_dir / f"ckpt_{self.step:07d}.pt"
        state = self.state_dict()  # on every rank: gathering a sharded model is collective
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, state)
            if self.cfg.keep_checkpoints > 0:  # by step: never a newer file, never this one
                older = [p for p in checkpoints(self.out_dir) if checkpoint_step(p) < self.step]
                for old in older[:max(len(older) - self.cfg.keep_checkpoints + 1, 0)]:
                    old.unlink()
        if self.dist.enabled:
            torch_dist.barrier()
        self.checkpoint_path = path
        self._callback("on_checkpoint", path)
        return path

    def _last_good(self) -> str:
        return (f"The last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path
                else "No checkpoint was written yet")

    def _earlier_run(self) -> list[Path]:
        return checkpoints(self.out_dir) + sorted(self.out_dir.glob("metrics.jsonl"))

    def _check_out_dir(self) -> None:
        """A fresh run never mixes with an earlier one in the same out_dir: refuse, unless resuming
        (continue it) or overwriting (delete its checkpoints and metrics)."""
        earlier = self._earlier_run()
        if not earlier or self.cfg.resume:
            return
        if not self.cfg.overwrite:
            raise UserError(f"{self.out_dir} holds an earlier run ({earlier[0].name}); pass "
                            "--resume true to continue it or --overwrite true to start over")
        if self.dist.enabled:
            torch_dist.barrier()  # every rank has looked before rank 0 deletes
        if self.dist.is_main:
            for path in earlier:
                path.unlink()
        if self.dist.enabled:
            torch_dist.barrier()

    def _find_resume_state(self) -> tuple[Path | None, dict | None]:
        """The newest good checkpoint (each rank reads the file: multi-node runs need a shared file
        system for `out_dir`). An out_dir with an earlier run but no loadable checkpoint is an
        error that touches nothing: starting over must be asked for with --overwrite."""
        path, state, problems = latest_checkpoint(self.out_dir, quiet=not self.dist.is_main)
        if self.dist.enabled:  # every rank resumes rank 0's choice, or all stop alike
            choice = [str(path) if path is not None else None]
            torch_dist.broadcast_object_list(choice, src=0)
            if choice[0] != (str(path) if path is not None else None):
                if choice[0] is None:
                    path, state = None, None
                else:
                    path = Path(choice[0])
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if path is not None and self.dist.is_main:
            # Damaged checkpoints newer than the one resumed would otherwise count as "newest"
            # when old ones are pruned: move them aside (kept, renamed, not deleted).
            for newer in checkpoints(self.out_dir):
                if checkpoint_step(newer) > checkpoint_step(path):
                    newer.rename(newer.with_name(newer.name + ".damaged"))
                    print(f"moved the unreadable {newer.name} aside to {newer.name}.damaged")
        if path is None:
            earlier = self._earlier_run()
            if earlier:
                found = "; ".join(problems) if problems else "no checkpoint, only metrics.jsonl"
                raise UserError(f"--resume: {self.out_dir} holds an earlier run but no checkpoint "
                                f"that loads ({found}); nothing was changed. Pass --overwrite true "
                                "(without --resume) to start over")
            if self.dist.is_main:
                print(f"--resume: no checkpoint in {self.out_dir}, starting from step 0")
        return path, state

    def _check_resume_config(self, path: Path, saved: dict) -> None:
        """Fields that fix the model, the data stream or the random state must match the
        checkpoint's; the others (`CHANGEABLE_ON_RESUME`) may change, and each change is printed."""
        for f in dataclasses.fields(self.cfg):
            if f.name not in saved:
                continue
            mine = getattr(self.cfg, f.name)
            theirs = saved[f.name]
            if mine == theirs:
                continue
            if f.name not in CHANGEABLE_ON_RESUME:
                raise UserError(f"--{_flag(f.name)} {mine!r} contradicts the run being resumed "
                                f"({path} has {theirs!r}); drop the flag, or start a new run in "
                                "another --out-dir")
            if self.dist.is_main and f.name not in ("resume", "overwrite", "progress", "out_dir"):
                print(f"resume: --{_flag(f.name)} changes from {theirs!r} to {mine!r}")

    def _load_state(self, path: Path, state: dict) -> None:
        options = StateDictOptions(full_state_dict=True)
        model, optimizer = state["model"], state["optimizer"]
        if self.sharded:  # this rank's share of the experts, from their global indices
            names = set(self.sharded)
            rank, size = torch_dist.get_rank(self.ep_group), self.cfg.expert_parallel
            model = expert_parallel.shard_experts(model, names, rank, size)
            optimizer = {**optimizer, "state": expert_parallel.shard_optimizer_experts(
                optimizer["state"], names, rank, size)}
        set_model_state_dict(self.model, model, options=options)
        set_optimizer_state_dict(self.model, self.optimizer, optimizer, options=options)
        for group in self.optimizer.param_groups:  # settings changed on resume take effect
            if not group.get("own_lr"):
                group["betas"] = (self.cfg.beta1, self.cfg.beta2)
                if group.get("decayed"):
                    group["weight_decay"] = self.cfg.weight_decay
        if len(state["loader"]) != self.dist.world_size:
            raise UserError(f"{path} was written by {len(state['loader'])} process(es); resuming "
                            f"it exactly needs the same number, not {self.dist.world_size}")
        self.loader.load_state_dict(state["loader"][self.dist.rank])
        torch.set_rng_state(state["rng"][self.dist.rank])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][self.dist.rank], self.device)
        self.step = state["step"]
        self._load_callback_states(path, state.get("callbacks", {}))
        self.skipped_steps.fill_(state.get("skipped_steps", 0))
        self.checkpoint_path = path
        self._truncate_metrics()
        if self.dist.is_main:
            print(f"resumed from {path} at step {self.step}")

    # --- metrics ---
    def _truncate_metrics(self) -> None:
        """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
        path = self.out_dir / "metrics.jsonl"
        if self.dist.is_main and path.is_file():
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line)
                except (json.JSONDecodeError, KeyError, TypeError):
                    pass  # a line torn by a crash mid-write
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)

    def log(self, record: dict) -> None:
        """Append `record` to metrics.jsonl as strict JSON: a non-finite number is written as null."""
        if self.dist.is_main:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")

    def _eval_sets(self) -> dict:
        """{domain: iterator of (x, y, forward kwargs)} over the fixed validation windows: the first
        `eval_batches * batch_size` of each split, the same set for any number of processes."""
        max_windows = self.cfg.eval_batches * self.cfg.batch_size
        rank, world = self.dist.rank, self.dist.world_size
        if self.data_source is not None:
            return {self.loader.names[0]: self.loader.eval_batches(max_windows, rank, world)}
        return {name: ((x, y, {}) for x, y, _ in eval_batches(
                    dataset, self.cfg.block_size, self.cfg.batch_size, max_windows, rank, world,
                    self.device)) for name, dataset in self.val.items()}

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss (per target token) and perplexity on the fixed validation windows of every domain;
        `val_loss` is the unweighted mean over domains."""
        self.model.eval()
        result = {"step": self.step}
        for name, batches in self._eval_sets().items():
            total = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, targets
            for x, y, kwargs in batches:
                with self.autocast:
                    loss = self.model(x, y, **kwargs).loss.double()
                n = (y != IGNORE_INDEX).sum().double()
                # a batch with no target (a rank whose share ran out) has loss NaN and adds nothing
                total += torch.stack([torch.where(n > 0, loss * n, 0.0), n])
            if self.dist.enabled:
                torch_dist.all_reduce(total)
            loss_sum, targets = total.tolist()
            result[f"val_loss/{name}"] = loss_sum / targets
            result[f"val_ppl/{name}"] = math.exp(min(loss_sum / targets, 700.0))
        domain_losses = [v for k, v in result.items() if k.startswith("val_loss/")]
        result["val_loss"] = sum(domain_losses) / len(domain_losses)
        self.model.train()
        self.log(result)
        self._callback("on_eval", result)
        return result

    def _grad_sync(self, sync: bool):
        """Context for one micro-batch: gradients are all-reduced only on the last one."""
        if not self.dist.enabled or sync:
            if self.cfg.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.cfg.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.wrapped.no_sync()

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (before clipping), as a device tensor; clips to `grad_clip`.
        Under expert parallelism the norm counts every rank's experts, so that every rank clips
        by the same factor and replicated weights stay identical."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.sharded:
            sharded = {id(p) for p in self.sharded.values()}
            norm = expert_parallel.global_grad_norm(
                [p for p in params if id(p) not in sharded],
                [p for p in params if id(p) in sharded], self.ep_group, self.device)
            if self.cfg.grad_clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
            return norm.float()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        return norm.float()

    def _check_skipped_steps(self) -> None:
        """Stop once more than `max_skipped_steps` steps were non-finite (reads device counters)."""
        skipped = int(self.skipped_steps)
        if skipped > self.cfg.max_skipped_steps:
            raise FloatingPointError(
                f"{skipped} step(s) had a non-finite loss or gradient norm (the latest: step "
                f"{int(self.last_skipped_step)}), more than --max-skipped-steps "
                f"{self.cfg.max_skipped_steps}; their updates were skipped and the run stops "
                f"without saving. {self._last_good()}. Lower --lr or raise --warmup-steps")

    # --- swapping modules between steps (SSD, minillm/methods/ssd.py) ------------------------------------
    # A callback may replace submodules between steps (dense FFNs by MoE layers and back). The
    # optimizer is rebuilt for the new parameters and the wrapper (compile, DDP) around the model;
    # AdamW's moments follow the weights through the same `carry` map that moved the weights, so
    # that a swap and its inverse with no step between leave weights and moments bit-identical.

    def swap_modules(self, swaps: dict) -> None:
        """Replace submodules: {path ("blocks.1.ffn"): (new module, carry)}. `carry` maps the old
        module's {parameter name: tensor} to the new module's (e.g. `minillm.moefy.dense_to_experts`);
        it is applied to every per-parameter optimizer tensor (exp_avg, exp_avg_sq), and the step
        count is copied. Parameters of the new module that `carry` does not produce start with
        fresh moments; parameters outside the swapped modules keep theirs. Every rank must swap
        alike at the same step (DDP is rebuilt, which broadcasts rank 0's weights)."""
        if self.cfg.fsdp:
            raise UserError("swapping modules between steps (SSD's dense <-> sparse switch) is not "
                            "supported under FSDP (--fsdp): the shards would have to be rebuilt; "
                            "run with DDP")
        if self.sharded:
            raise UserError("swapping modules between steps (SSD's dense <-> sparse switch) is not "
                            "supported with --expert-parallel: run without it")
        old_state = self.optimizer.state
        carried = {}
        for path, (module, carry) in swaps.items():
            parent_path, _, name = path.rpartition(".")
            parent = self.model.get_submodule(parent_path)
            old_params = dict(getattr(parent, name).named_parameters())
            states = {n: old_state[p] for n, p in old_params.items() if old_state.get(p)}
            module = module.to(self.device)
            new_params = dict(module.named_parameters())
            if states:
                step = next(iter(states.values())).get("step")
                keys = {k for s in states.values() for k, v in s.items()
                        if k != "step" and isinstance(v, torch.Tensor)}
                per_key = {k: carry({n: s[k] for n, s in states.items() if k in s}) for k in keys}
                for k, mapped in per_key.items():
                    for n, tensor in mapped.items():
                        entry = carried.setdefault(new_params[n], {})
                        entry[k] = tensor.to(self.device)
                        if step is not None:
                            entry["step"] = step.clone()
            setattr(parent, name, module)
        kept = {p: old_state[p] for p in self.model.parameters() if p in old_state}
        self.optimizer = make_optimizer(self.model, self.cfg, self.device)
        for p in self.model.parameters():
            if p in kept:
                self.optimizer.state[p] = kept[p]
            elif p in carried:
                self.optimizer.state[p] = carried[p]
        self.wrapped = self.model
        if self.cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        if self.dist.enabled:
            self.wrapped = DDP(self.wrapped, device_ids=[self.dist.local_rank]
                               if self.device.type == "cuda" else None)

    def _callback_states(self) -> dict:
        """{key: state} of every callback with `state_dict()` (key: its `state_key` or class name),
        saved in the checkpoint so that a method's schedule resumes exactly."""
        return {getattr(cb, "state_key", type(cb).__name__): cb.state_dict()
                for cb in self.callbacks if hasattr(cb, "state_dict")}

    def _load_callback_states(self, path: Path, states: dict) -> None:
        for cb in self.callbacks:
            if hasattr(cb, "load_state_dict"):
                key = getattr(cb, "state_key", type(cb).__name__)
                if key not in states:
                    raise UserError(f"{path} holds no state of the {key} callback: it was written "
                                    "by a run without it, and cannot be resumed with it")
                cb.load_state_dict(states[key], self)

    # --- the loop ---
    def train(self) -> list[dict]:
        """Train to `max_steps`; returns one record per step (loss, lr, grad_norm, auxiliary
        losses; on log steps also tokens_per_s, mfu, skipped_steps). `on_step_end` callbacks get the
        record while its numbers are still 0-dim device tensors: `float()` one if needed (that
        waits for the device); the trainer turns them into floats on the next log step."""
        cfg = self.cfg
        self.model.train()
        history, pending = [], []  # pending: this log interval's records, numbers on the device
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum  # over all processes
        flops_per_token = self.model.flops_per_token(cfg.block_size)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", mininterval=1.0,
                   disable=not (cfg.progress and self.dist.is_main))
        t0, last_logged = time.perf_counter(), self.step
        while self.step < cfg.max_steps:
            self._callback("on_step_start")
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                if not group.get("own_lr"):  # a claimed group may keep a constant lr of its own
                    group["lr"] = lr
            loss = torch.zeros((), device=self.device)
            aux: dict[str, torch.Tensor] = {}
            for micro in range(self.accum):
                x, y, extra = self.loader.next_batch()
                # a data source may add forward arguments (packed SFT: positions and the mask);
                # a MixtureLoader's third item is the rows' domains
                kwargs = extra if isinstance(extra, dict) else {}
                with self._grad_sync(micro == self.accum - 1), self.autocast:
                    out = self.wrapped(x, y, **kwargs)
                    total = out.loss + sum(out.aux_losses.values())
                    (total / self.accum).backward()
                loss += out.loss.detach().float() / self.accum
                for name, value in out.aux_losses.items():
                    aux[name] = aux.get(name, 0.0) + value.detach().float() / self.accum
            if self.sharded:  # DDP left the experts alone: average them over their own replicas
                expert_parallel.reduce_expert_gradients(self.sharded.values(), self.dist.world_size,
                                                        self.expert_dp_group)
            grad_norm = self._clip_gradients()
            if self.dist.enabled:
                torch_dist.all_reduce(loss, op=torch_dist.ReduceOp.AVG)
            # Skip a non-finite step on the device, without waiting for it: fused AdamW leaves
            # parameters, moments and its step count alone where found_inf is 1 (as under GradScaler).
            # loss and grad_norm are the same on every rank, so every rank skips alike.
            bad = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))
            self.optimizer.found_inf = bad.float()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += bad
            self.last_skipped_step = torch.where(bad, self.step + 1, self.last_skipped_step)
            self.step += 1
            record = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **aux}
            history.append(record)
            pending.append(record)
            self._callback("on_step_end", record)
            bar.update(1)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                self._read_numbers(pending)  # the one wait for the device in a log interval
                pending = []
                elapsed = time.perf_counter() - t0
                record["tokens_per_s"] = tokens_per_step * (self.step - last_logged) / max(elapsed, 1e-9)
                record["skipped_steps"] = int(self.skipped_steps)
                line = (f"step {self.step:>6} | loss {record['loss']:.4f} | lr {lr:.2e} | "
                        f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:,.0f} tok/s")
                if self.peak_flops:
                    record["mfu"] = (flops_per_token * record["tokens_per_s"]
                                     / (self.peak_flops * self.dist.world_size))
                    line += f" | MFU {100 * record['mfu']:.1f}%"
                if record["skipped_steps"]:
                    line += f" | {record['skipped_steps']} non-finite step(s) skipped"
                t0, last_logged = time.perf_counter(), self.step
                self.log(record)
                if self.dist.is_main:
                    bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
                    bar.write(line)
                self._check_skipped_steps()
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                self._check_skipped_steps()
                result = self.evaluate()
                if self.dist.is_main:
                    bar.write(f"step {self.step:>6} | val loss " + " | ".join(
                        f"{k[9:]} {v:.4f}" for k, v in result.items() if k.startswith("val_loss/")))
            if cfg.ckpt_interval and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_steps):
                self.save()
        bar.close()
        return history

    @staticmethod
    def _read_numbers(records: list[dict]) -> None:
        """Replace the device tensors in `records` by floats, with one transfer."""
        slots = [(r, k) for r in records for k, v in r.items() if isinstance(v, torch.Tensor)]
        if slots:
            values = torch.stack([r[k].float() for r, k in slots]).tolist()
            for (r, k), v in zip(slots, values):
                r[k] = v
