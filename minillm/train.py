"""The training loop: AdamW, warmup + cosine / warmup-stable-decay, accumulation, clipping, DDP,
exact resume from atomic checkpoints, and callbacks for methods that act between steps.

Read `Trainer.train` top to bottom: one step is `grad_accum / world_size` micro-batches per rank
(so the global batch does not depend on the number of processes), the model's loss plus its
auxiliary losses, gradient clipping, one optimizer step. Methods plug in through callbacks
(`on_step_start`, `on_step_end`, `on_eval`, `on_checkpoint`) instead of copying the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
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

from .data import MixtureLoader, TokenDataset, TokenLoader, eval_batches, parse_domains
from .distributed import DistInfo
from .model import GPT, ModelConfig, load_model, preset
from .tokenizer import load_tokenizer

CHECKPOINT_FORMAT = "minillm.train"
# Peak dense bf16 tensor-core FLOP/s (no sparsity), from NVIDIA's data sheets; matched against
# torch.cuda.get_device_name() in this order. MFU is reported only for GPUs listed here.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H200", 989e12), ("H100", 989e12), ("A100", 312e12),
                   ("L40S", 362e12), ("L4", 121e12)]


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


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
    progress: bool = True


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
    raise ValueError(f"schedule must be cosine or wsd, got {cfg.schedule!r}")


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW. Matrices (dim >= 2: linear weights, embeddings) get weight decay; biases and norm
    gains (dim 1) do not: shrinking them towards 0 only fights the normalisation."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device.type == "cuda")


# --- checkpoints ------------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Write atomically: a crash mid-write leaves only a `.tmp` file, never a damaged checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: Path) -> tuple[Path, dict] | tuple[None, None]:
    """The newest checkpoint in `out_dir` that loads, skipping damaged ones (with a message)."""
    for path in sorted(out_dir.glob("ckpt_*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged file: fall back to the one before it
            print(f"skipping unreadable checkpoint {path}: {e}")
            continue
        if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
            return path, state
    return None, None


# --- the trainer -----------------------------------------------------------------------------------

class Trainer:
    """Builds data, model and optimizer from a `TrainConfig` and runs the loop.

    `self.model` is the plain `GPT` (sharded in place under FSDP2); `self.wrapped` is what the loop
    calls (DDP and / or torch.compile around it). `self.loader` is a `MixtureLoader` over the
    domains of `cfg.data` (one domain is a mixture of one); callbacks may change its weights.
    `model_transform` (GPT -> GPT) runs on the fresh model before the optimizer is built: methods
    use it to swap modules, e.g. dense FFNs for MoE layers."""

    def __init__(self, cfg: TrainConfig, dist: DistInfo, callbacks: list | None = None,
                 model_config: ModelConfig | None = None, model_transform=None):
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks or [])
        if cfg.grad_accum % dist.world_size:
            raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the number of "
                             f"processes {dist.world_size}")
        self.accum = cfg.grad_accum // dist.world_size
        self.out_dir = Path(cfg.out_dir)
        self.device = dist.device
        self._build_data()
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        if cfg.init_from:
            self.model = self._load_initial_model(cfg.init_from).float().to(self.device)
        else:
            if model_config is None:
                sizes = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k)}
                model_config = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size,
                                      block_size=cfg.block_size, dropout=cfg.dropout, **sizes)
            self.model = GPT(model_config).to(self.device)
        if model_transform is not None:  # e.g. replace FFNs by MoE layers, before the optimizer
            self.model = model_transform(self.model).to(self.device)
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if cfg.fsdp:
            # Shard every block, then the root (embeddings, final norm, head): each block's
            # parameters are gathered just before it runs and freed after.
            for block in self.model.blocks:
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.checkpoint_path = None
        self._check_out_dir()
        if cfg.resume:
            self._resume()
        self.wrapped = self.model
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        if dist.enabled and not cfg.fsdp:
            self.wrapped = DDP(self.wrapped, device_ids=[dist.local_rank] if self.device.type == "cuda"
                               else None)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.peak_flops = peak_flops(self.device)

    def _load_initial_model(self, source: str) -> GPT:
        """Weights to continue from; the data must have been tokenized with the model's tokenizer."""
        if Path(source).is_dir():
            from .hf import load_hf
            model = load_hf(source)
        else:
            model = load_model(source)[0]
        if self.tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the data's tokenizer has {self.tokenizer.vocab_size} ids but "
                             f"{source} has {model.config.vocab_size} embeddings: prepare the data "
                             "with the model's tokenizer (prepare_data.py --tokenizer)")
        if self.cfg.block_size > model.config.block_size and model.config.position == "learned":
            raise ValueError(f"--block-size {self.cfg.block_size} exceeds the {model.config.block_size} "
                             f"positions of {source}")
        return model.train()

    def _build_data(self) -> None:
        cfg, dist = self.cfg, self.dist
        domains = parse_domains(cfg.data)
        self.tokenizer = None
        loaders, weights, self.val = {}, {}, {}
        for name, (path, weight) in domains.items():
            tok = load_tokenizer(Path(path) / "tokenizer.json")
            if self.tokenizer is None:
                self.tokenizer, first = tok, path
            elif tok.to_dict() != self.tokenizer.to_dict():
                raise ValueError(f"{path} was tokenized with another tokenizer than {first}: "
                                 "all domains must share one")
            loaders[name] = TokenLoader(TokenDataset(path, "train"), cfg.block_size, cfg.batch_size,
                                        seed=cfg.seed, rank=dist.rank, world_size=dist.world_size,
                                        device=self.device)
            self.val[name] = TokenDataset(path, "val")
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
        state = {"format": CHECKPOINT_FORMAT, "step": self.step,
                 "model": get_model_state_dict(self.model, options=options),
                 "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
                 "loader": self._per_rank(self.loader.state_dict()),
                 "rng": self._per_rank(torch.get_rng_state()),
                 "train_config": dataclasses.asdict(self.cfg),
                 "model_config": self.model.config.to_dict(), "tokenizer": self.tokenizer.to_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = self._per_rank(torch.cuda.get_rng_state(self.device))
        return state

    def save(self) -> Path:
        path = self.out_dir / f"ckpt_{self.step:07d}.pt"
        state = self.state_dict()  # on every rank: gathering a sharded model is collective
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, state)
            if self.cfg.keep_checkpoints > 0:
                for old in sorted(self.out_dir.glob("ckpt_*.pt"))[:-self.cfg.keep_checkpoints]:
                    old.unlink()
        if self.dist.enabled:
            torch_dist.barrier()
        self.checkpoint_path = path
        self._callback("on_checkpoint", path)
        return path

    def _check_out_dir(self) -> None:
        """A fresh run never mixes with an earlier one in the same out_dir: refuse, unless resuming
        (continue it) or overwriting (delete its checkpoints and metrics)."""
        earlier = list(self.out_dir.glob("ckpt_*.pt")) + list(self.out_dir.glob("metrics.jsonl"))
        if not earlier or self.cfg.resume:
            return
        if not self.cfg.overwrite:
            raise FileExistsError(f"{self.out_dir} holds an earlier run ({earlier[0].name}); pass "
                                  "--resume true to continue it or --overwrite true to start over")
        if self.dist.enabled:
            torch_dist.barrier()  # every rank has looked before rank 0 deletes
        if self.dist.is_main:
            for path in earlier:
                path.unlink()
        if self.dist.enabled:
            torch_dist.barrier()

    def _resume(self) -> None:
        """Load the newest good checkpoint (each rank reads the file: multi-node runs need a
        shared file system for `out_dir`)."""
        path, state = latest_checkpoint(self.out_dir)
        if path is None:
            print(f"--resume: no checkpoint in {self.out_dir}, starting from step 0")
            self._truncate_metrics()
            return
        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, state["model"], options=options)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=options)
        if len(state["loader"]) != self.dist.world_size:
            raise ValueError(f"{path} was written by {len(state['loader'])} process(es); resuming it "
                             f"exactly needs the same number, not {self.dist.world_size}")
        self.loader.load_state_dict(state["loader"][self.dist.rank])
        torch.set_rng_state(state["rng"][self.dist.rank])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"][self.dist.rank], self.device)
        self.step = state["step"]
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
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Loss and perplexity on the fixed validation windows of every domain; `val_loss` is
        their unweighted mean."""
        self.model.eval()
        result = {"step": self.step}
        for name, dataset in self.val.items():
            losses = []
            for x, y in eval_batches(dataset, self.cfg.block_size, self.cfg.batch_size,
                                     self.cfg.eval_batches, self.dist.rank, self.dist.world_size,
                                     self.device):
                with self.autocast:
                    losses.append(self.model(x, y).loss.float())
            if not losses:
                raise ValueError(f"domain {name!r}: the val split holds fewer than batch_size "
                                 f"({self.cfg.batch_size}) windows of {self.cfg.block_size + 1} "
                                 "tokens per rank; raise val_fraction when preparing, or set "
                                 "--eval-interval 0")
            loss = torch.stack(losses).mean()
            if self.dist.enabled:
                torch_dist.all_reduce(loss, op=torch_dist.ReduceOp.AVG)
            result[f"val_loss/{name}"] = loss.item()
            result[f"val_ppl/{name}"] = math.exp(loss.item())
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

    # --- the loop ---
    def train(self) -> list[dict]:
        cfg = self.cfg
        self.model.train()
        history = []
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum  # over all processes
        flops_per_token = self.model.flops_per_token(cfg.block_size)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", mininterval=1.0,
                   disable=not (cfg.progress and self.dist.is_main))
        t0, last_logged = time.perf_counter(), self.step
        while self.step < cfg.max_steps:
            self._callback("on_step_start")
            lr = lr_at(self.step, cfg)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            total_loss = torch.zeros((), device=self.device)
            aux_totals: dict[str, float] = {}
            for micro in range(self.accum):
                x, y, _ = self.loader.next_batch()
                with self._grad_sync(micro == self.accum - 1), self.autocast:
                    out = self.wrapped(x, y)
                    loss = out.loss + sum(out.aux_losses.values())
                    (loss / self.accum).backward()
                total_loss += out.loss.detach() / self.accum
                for name, value in out.aux_losses.items():
                    aux_totals[name] = aux_totals.get(name, 0.0) + value.item() / self.accum
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.zeros(()))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if self.dist.enabled:
                torch_dist.all_reduce(total_loss, op=torch_dist.ReduceOp.AVG)
            loss_value = total_loss.item()
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"loss is {loss_value} at step {self.step}; stopping without saving. The last "
                    f"good checkpoint is {self.checkpoint_path or 'none (no checkpoint yet)'}")
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            record = {"step": self.step, "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm), **aux_totals}
            history.append(record)
            self._callback("on_step_end", record)
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                record["tokens_per_s"] = tokens_per_step * (self.step - last_logged) / max(elapsed, 1e-9)
                line = (f"step {self.step:>6} | loss {loss_value:.4f} | lr {lr:.2e} | "
                        f"grad norm {float(grad_norm):.3f} | {record['tokens_per_s']:,.0f} tok/s")
                if self.peak_flops:
                    record["mfu"] = (flops_per_token * record["tokens_per_s"]
                                     / (self.peak_flops * self.dist.world_size))
                    line += f" | MFU {100 * record['mfu']:.1f}%"
                t0, last_logged = time.perf_counter(), self.step
                self.log(record)
                if self.dist.is_main:
                    bar.write(line)
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                result = self.evaluate()
                if self.dist.is_main:
                    bar.write(f"step {self.step:>6} | val loss " + " | ".join(
                        f"{k[9:]} {v:.4f}" for k, v in result.items() if k.startswith("val_loss/")))
            if cfg.ckpt_interval and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_steps):
                self.save()
        bar.close()
        return history
