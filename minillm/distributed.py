"""Process-group setup: the same script runs as one process or under `torchrun`.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE (and, across nodes, its rendezvous settles
MASTER_ADDR / MASTER_PORT); `setup()` reads them, picks NCCL on GPUs and gloo on the CPU, and binds
each process to its GPU. `MINILLM_DIST_TIMEOUT_S` bounds how long a collective may wait (tests use a
few seconds so that a hung rank fails fast instead of after torch's default 30 minutes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from . import expert_parallel
from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; choose the device."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise UserError(f"--device {device}: no CUDA GPU is visible (torch {torch.__version__} is "
                        f"{build}); pass --device cpu or auto")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {device!r}: minillm trains on cpu or cuda")
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("MINILLM_DIST_TIMEOUT_S", 1800)))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout)
    return DistInfo(rank, local_rank, world, dev)


def cleanup() -> None:
    """Wait for every rank, drop the references that MoE layers and trainers hold to expert-parallel
    groups, then tear the process groups down (a rank that leaves while another is still talking
    to it can abort the other's communication threads, and a group finalised after teardown can
    abort the process)."""
    if dist.is_initialized():
        dist.barrier()
        expert_parallel.release_groups()
        dist.destroy_process_group()
