"""The settings of a training run (`TrainConfig`): every field is a flag of scripts/pretrain.py
(minillm.cli), and `validate` names the first flag out of range before anything is written.
A training checkpoint stores these fields; checkpoint.CHANGEABLE_ON_RESUME says which a resumed
run may change."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError


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
