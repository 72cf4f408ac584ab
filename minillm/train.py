"""The training loop: AdamW, warmup + cosine / warmup-stable-decay, accumulation, clipping, DDP
or FSDP2 (with MoE experts optionally sharded over ranks: `--expert-parallel`), exact resume, and
callbacks for methods that act between steps.

Read `Trainer.train` top to bottom: one step is `grad_accum / world_size` micro-batches per rank
(so the global batch does not depend on the number of processes), the model's loss plus its
auxiliary losses, gradient clipping, one optimizer step. Methods plug in through callbacks
(`on_step_start`, `on_step_end`, `on_eval`, `on_checkpoint`) instead of copying the loop.
Checkpoints and resume live in checkpoint.py, data loading in data.py, MoE layers in moe.py.

The loop never waits for the GPU except on log, eval and checkpoint steps (as nanoGPT): losses stay
on the device until a log step reads them all at once. A step whose loss or gradient norm is not
finite is skipped on the device (fused AdamW's `found_inf`: no update, no moment change, no step
count), counted, and the run stops once more than `max_skipped_steps` were skipped
(`TrainingDiverged`: one `error:` line in scripts, naming the last good checkpoint); that stop
writes nothing, neither a checkpoint nor the step's metrics line.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import checkpoint, expert_parallel
from .data import build_mixture, check_data_source, eval_batches
from .distributed import DistInfo
from .errors import UserError
from .hf import load_hf
from .model import GPT, IGNORE_INDEX, ModelConfig, preset
from .moe import MoE, MoEConfig, replace_ffns_with_moe
from .train_config import TrainConfig

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


class TrainingDiverged(UserError, FloatingPointError):
    """Too many non-finite steps, or a non-finite parameter at a checkpoint: the run stops and
    writes nothing (scripts print one `error:` line naming the last good checkpoint, exit 2)."""


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


# --- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Builds data, model and optimizer from a `TrainConfig` and runs the loop.

    `self.model` is the plain `GPT` (sharded in place under FSDP2); `self.wrapped` is what the loop
    calls (DDP and / or torch.compile around it). `self.loader` is a `MixtureLoader` over the
    domains of `cfg.data` (one domain is a mixture of one); callbacks may change its weights.
    `model_transform` (GPT -> GPT) runs on the fresh model before the optimizer is built: methods
    use it to swap modules, e.g. dense FFNs for MoE layers. `plan_transforms` are the routing-plan
    transforms of MoE layers made by the `--moe-*` flags (scripts/pretrain.py builds them from
    `--moe-rectify`: the library never imports a method).

    `data_source` replaces the loaders built from `cfg.data`: any object with `next_batch()` ->
    (x, y, forward kwargs or anything else), `state_dict()` / `load_state_dict()` (saved per rank
    for exact resume), `names` and, for evaluation, `eval_batches(max_windows, rank, world_size)`
    (see `minillm.sft.PackedLoader`); `tokenizer` must then be given. The loss of a micro-batch is
    the mean over its target tokens (targets of -100 are ignored).

    Everything the flags and data can get wrong is checked here, before anything is written. With
    `resume`, the model is rebuilt from the checkpoint's own config; a field of `cfg` outside
    `checkpoint.CHANGEABLE_ON_RESUME` that differs from the checkpoint's is an error."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, callbacks: list | None = None,
                 model_config: ModelConfig | None = None, model_transform=None,
                 data_source=None, tokenizer=None, plan_transforms: list | None = None):
        cfg.validate()
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks or [])
        if cfg.grad_accum % dist.world_size:
            raise UserError(f"--grad-accum {cfg.grad_accum} must be a multiple of the number of "
                            f"processes {dist.world_size}")
        self.accum = cfg.grad_accum // dist.world_size
        self.out_dir, self.device = Path(cfg.out_dir), dist.device
        # the checkpoint first: a run that cannot resume says so before the data is looked at
        resume_path, resume_state = (checkpoint.find_resume_state(self.out_dir, dist)
                                     if cfg.resume else (None, None))
        self.data_source = data_source
        if data_source is None:
            self.loader, self.tokenizer, self.val = build_mixture(
                cfg.data, cfg.block_size, cfg.batch_size, cfg.seed, dist.rank, dist.world_size,
                self.device, with_validation=cfg.eval_interval > 0)
        else:  # batches from the caller, e.g. minillm.sft.PackedLoader; cfg.data is not read
            check_data_source(data_source, tokenizer, cfg.block_size, dist.rank, dist.world_size,
                              cfg.eval_interval)
            self.loader, self.tokenizer, self.val = data_source, tokenizer, {}
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if resume_state is not None:  # the checkpoint's own model, whatever the flags say
            checkpoint.check_resume_config(cfg, resume_path, resume_state["train_config"],
                                           verbose=dist.is_main)
            model_config = ModelConfig(**resume_state["model_config"])
        self.model = self._build_model(model_config, plan_transforms)
        # the first thing that may write (delete an earlier run, with --overwrite)
        checkpoint.prepare_out_dir(self.out_dir, dist, cfg.resume, cfg.overwrite)
        if model_transform is not None:  # e.g. replace FFNs by MoE layers, before the optimizer
            self.model = model_transform(self.model).to(self.device)
        if dist.rank:  # identical weights above; from here each rank draws its own noise (dropout)
            torch.manual_seed(cfg.seed + dist.rank)
        self.sharded, self.ep_group, self.expert_dp_group = expert_parallel.shard_model(
            self.model, cfg.expert_parallel, dist.world_size)  # ({}, None, None) without EP
        if self.sharded:  # released by distributed.cleanup, with the layers' references
            expert_parallel.hold(self, "ep_group")
            expert_parallel.hold(self, "expert_dp_group")
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
            checkpoint.load_training_state(self, resume_path, resume_state)
        self.wrap()
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.peak_flops = peak_flops(self.device)

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
                self._check_skipped_steps()  # a stop writes nothing, not even this step's line
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

    def log(self, record: dict) -> None:
        """Append `record` to metrics.jsonl as strict JSON: a non-finite number is written as null."""
        if self.dist.is_main:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                     for k, v in record.items()}
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(clean, allow_nan=False) + "\n")

    # --- checkpoints (the format and resume: checkpoint.py) ---
    def state_dict(self) -> dict:
        """The full training state (a collective under FSDP / expert parallelism)."""
        return checkpoint.training_state(self)

    def save(self) -> Path:
        """Write `ckpt_<step>.pt` atomically and keep the newest `keep_checkpoints`. Never from a
        non-finite state: the skipped-step limit and the parameters are checked first."""
        self._check_skipped_steps()
        if not self._parameters_finite():
            raise TrainingDiverged(f"a parameter is not finite at step {self.step}; the run stops "
                                   f"without saving. {self._last_good()}")
        self.checkpoint_path = checkpoint.save_training_checkpoint(self)
        self._callback("on_checkpoint", self.checkpoint_path)
        return self.checkpoint_path

    def _check_skipped_steps(self) -> None:
        """Stop once more than `max_skipped_steps` steps were non-finite (reads device counters)."""
        skipped = int(self.skipped_steps)
        if skipped > self.cfg.max_skipped_steps:
            raise TrainingDiverged(
                f"{skipped} step(s) had a non-finite loss or gradient norm (the latest: step "
                f"{int(self.last_skipped_step)}), more than --max-skipped-steps "
                f"{self.cfg.max_skipped_steps}; their updates were skipped and the run stops "
                f"without saving. {self._last_good()}. Lower --lr or raise --warmup-steps")

    def _last_good(self) -> str:
        return (f"The last good checkpoint is {self.checkpoint_path}" if self.checkpoint_path
                else "No checkpoint was written yet")

    def _parameters_finite(self) -> bool:
        """Whether every parameter is finite on every rank (one reduction; local shards under FSDP)."""
        local = [p.to_local() if hasattr(p, "to_local") else p for p in self.model.parameters()]
        finite = torch.stack([torch.isfinite(p).all() for p in local]).all().to(torch.int32)
        if self.dist.enabled:
            torch_dist.all_reduce(finite, op=torch_dist.ReduceOp.MIN)
        return bool(finite)

    # --- building ---
    def _build_model(self, model_config: ModelConfig | None, plan_transforms) -> GPT:
        """The model of `model_config`, of `--init-from`, or of the preset and size flags; then the
        MoE layers of the `--moe-*` flags (unless the model has some already)."""
        cfg, source = self.cfg, self.cfg.init_from
        if model_config is None and source:  # continued pretraining: a minillm file or an HF folder
            model = load_hf(source) if Path(source).is_dir() else checkpoint.load_model(source)[0]
            model = model.float().train()
        else:
            if model_config is None:
                sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
                model_config = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size,
                                      block_size=cfg.block_size, dropout=cfg.dropout, **sizes)
            model = GPT(model_config)
        model = model.to(self.device)
        config, described = model.config, source or f"--preset {cfg.preset}"
        if self.tokenizer.vocab_size > config.vocab_size:
            raise UserError(f"the data's tokenizer has {self.tokenizer.vocab_size} ids but the model "
                            f"({described}) has {config.vocab_size} embeddings: prepare the data with "
                            "the model's tokenizer (prepare_data.py --tokenizer)")
        if cfg.block_size > config.block_size and config.position == "learned":
            raise UserError(f"--block-size {cfg.block_size} exceeds the {config.block_size} "
                            f"positions of the model ({described})")
        if cfg.moe_experts and not any(isinstance(b.ffn, MoE) for b in model.blocks):
            if cfg.moe_rectify and plan_transforms is None:
                raise UserError(f"--moe-rectify {' '.join(cfg.moe_rectify)} needs the transforms: "
                                "pass Trainer(plan_transforms=...) (scripts/pretrain.py does)")
            moe_cfg = MoEConfig(num_experts=cfg.moe_experts, top_k=cfg.moe_top_k,
                                expert_hidden=cfg.moe_expert_hidden or config.ffn_hidden,
                                activation=config.activation, capacity_factor=cfg.moe_capacity_factor)
            replace_ffns_with_moe(model, moe_cfg, cfg.moe_layers or None,
                                  plan_transforms=list(plan_transforms or []))
        return model

    def wrap(self) -> None:
        """(Re)build `self.wrapped` around `self.model`: torch.compile and / or DDP. Call it after
        replacing modules of the model (see minillm.methods.ssd.swap_modules)."""
        self.wrapped = self.model
        if self.cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        if self.dist.enabled and not self.cfg.fsdp:
            if self.sharded:  # experts differ between ranks: DDP must not broadcast or average them
                sharded = {id(p) for p in self.sharded.values()}
                DDP._set_params_and_buffers_to_ignore_for_model(
                    self.wrapped, [n for n, p in self.wrapped.named_parameters() if id(p) in sharded])
            self.wrapped = DDP(self.wrapped, device_ids=[self.dist.local_rank]
                               if self.device.type == "cuda" else None)

    # --- one step's pieces ---
    def _callback(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

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

    @staticmethod
    def _read_numbers(records: list[dict]) -> None:
        """Replace the device tensors in `records` by floats, with one transfer."""
        slots = [(r, k) for r in records for k, v in r.items() if isinstance(v, torch.Tensor)]
        if slots:
            values = torch.stack([r[k].float() for r, k in slots]).tolist()
            for (r, k), v in zip(slots, values):
                r[k] = v
