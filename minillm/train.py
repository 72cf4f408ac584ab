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
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from .data import TokenDataset, TokenLoader, eval_batches
from .distributed import DistInfo
from .model import GPT, ModelConfig, preset
from .tokenizer import Tokenizer

CHECKPOINT_FORMAT = "minillm.train"


@dataclass
class TrainConfig:
    data: str = field(default="data/default", metadata={"help": "dataset folder from prepare_data"})
    out_dir: str = field(default="out/run", metadata={"help": "checkpoints and metrics.jsonl"})
    preset: str = field(default="tiny-gpt", metadata={"help": "model preset (minillm.model.PRESETS)"})
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
    keep_checkpoints: int = 2
    resume: bool = field(default=False, metadata={"help": "continue from the latest good checkpoint"})
    seed: int = 0
    device: str = "auto"
    compile: bool = False
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
    def __init__(self, cfg: TrainConfig, dist: DistInfo, callbacks: list | None = None,
                 model_config: ModelConfig | None = None):
        self.cfg, self.dist, self.callbacks = cfg, dist, list(callbacks or [])
        if cfg.grad_accum % dist.world_size:
            raise ValueError(f"grad_accum {cfg.grad_accum} must be a multiple of the number of "
                             f"processes {dist.world_size}")
        self.accum = cfg.grad_accum // dist.world_size
        self.out_dir = Path(cfg.out_dir)
        self.device = dist.device
        self.tokenizer = Tokenizer.load(Path(cfg.data) / "tokenizer.json")
        train = TokenDataset(cfg.data, "train")
        self.val = TokenDataset(cfg.data, "val")
        self.loader = TokenLoader(train, cfg.block_size, cfg.batch_size, seed=cfg.seed,
                                  rank=dist.rank, world_size=dist.world_size, device=self.device)
        if model_config is None:
            model_config = preset(cfg.preset, vocab_size=self.tokenizer.vocab_size,
                                  block_size=cfg.block_size, dropout=cfg.dropout)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = GPT(model_config).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.step = 0
        self.checkpoint_path = None
        if cfg.resume:
            self._resume()
        self.wrapped = self.model
        if cfg.compile:
            self.wrapped = torch.compile(self.wrapped)
        if dist.enabled:
            self.wrapped = DDP(self.wrapped, device_ids=[dist.local_rank] if self.device.type == "cuda"
                               else None)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())

    def _callback(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    # --- checkpoints ---
    def state_dict(self) -> dict:
        state = {"format": CHECKPOINT_FORMAT, "step": self.step,
                 "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "loader": self.loader.state_dict(), "rng": torch.get_rng_state(),
                 "train_config": dataclasses.asdict(self.cfg),
                 "model_config": self.model.config.to_dict(), "tokenizer": self.tokenizer.to_dict()}
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        return state

    def save(self) -> Path:
        path = self.out_dir / f"ckpt_{self.step:07d}.pt"
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(path, self.state_dict())
            for old in sorted(self.out_dir.glob("ckpt_*.pt"))[:-self.cfg.keep_checkpoints]:
                old.unlink()
        self.checkpoint_path = path
        self._callback("on_checkpoint", path)
        return path

    def _resume(self) -> None:
        path, state = latest_checkpoint(self.out_dir)
        if path is None:
            print(f"--resume: no checkpoint in {self.out_dir}, starting from step 0")
            return
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
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
            keep = [line for line in path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.step]
            path.write_text("".join(line + "\n" for line in keep))

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        losses = []
        for x, y in eval_batches(self.val, self.cfg.block_size, self.cfg.batch_size,
                                 self.cfg.eval_batches, self.dist.rank, self.dist.world_size,
                                 self.device):
            with self.autocast:
                losses.append(self.model(x, y).loss.float())
        self.model.train()
        if not losses:
            raise ValueError(f"{self.cfg.data}: the val split holds fewer than batch_size "
                             f"({self.cfg.batch_size}) windows of {self.cfg.block_size + 1} tokens; "
                             "raise val_fraction when preparing, or set --eval-interval 0")
        loss = torch.stack(losses).mean()
        if self.dist.enabled:
            torch.distributed.all_reduce(loss, op=torch.distributed.ReduceOp.AVG)
        result = {"step": self.step, "val_loss": loss.item(), "val_ppl": math.exp(loss.item())}
        self.log(result)
        self._callback("on_eval", result)
        return result

    # --- the loop ---
    def train(self) -> list[dict]:
        cfg = self.cfg
        self.model.train()
        history = []
        tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training",
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
                x, y = self.loader.next_batch()
                sync = micro == self.accum - 1 or not self.dist.enabled
                with (contextlib.nullcontext() if sync else self.wrapped.no_sync()), self.autocast:
                    out = self.wrapped(x, y)
                    loss = out.loss + sum(out.aux_losses.values())
                    (loss / self.accum).backward()
                total_loss += out.loss.detach() / self.accum
                for name, value in out.aux_losses.items():
                    aux_totals[name] = aux_totals.get(name, 0.0) + value.item() / self.accum
            grad_norm = (torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
                         if cfg.grad_clip > 0 else torch.zeros(()))
            if self.dist.enabled:
                torch.distributed.all_reduce(total_loss, op=torch.distributed.ReduceOp.AVG)
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
            bar.set_postfix(loss=f"{loss_value:.3f}")
            if self.step % cfg.log_interval == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - t0
                record["tokens_per_s"] = tokens_per_step * (self.step - last_logged) / max(elapsed, 1e-9)
                t0, last_logged = time.perf_counter(), self.step
                self.log(record)
                if self.dist.is_main:
                    bar.write(f"step {self.step:>6} | loss {loss_value:.4f} | lr {lr:.2e} | "
                              f"grad norm {float(grad_norm):.3f} | {record['tokens_per_s']:,.0f} tok/s")
            if cfg.eval_interval and (self.step % cfg.eval_interval == 0 or self.step == cfg.max_steps):
                result = self.evaluate()
                if self.dist.is_main:
                    bar.write(f"step {self.step:>6} | val loss {result['val_loss']:.4f} | "
                              f"val ppl {result['val_ppl']:.2f}")
            if cfg.ckpt_interval and (self.step % cfg.ckpt_interval == 0 or self.step == cfg.max_steps):
                self.save()
        bar.close()
        return history
