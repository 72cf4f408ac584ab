"""Launching multi-process tests: `torchrun --standalone --nproc_per_node=N` in a subprocess.

Workers use gloo on the CPU and call `init_process_group(timeout=...)` with a short timeout (see
`WORKER_TIMEOUT_S`), so a hung rank fails the test in seconds instead of torch's 30 minutes; the
launch itself is bounded by `timeout` seconds.
"""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 30


def torchrun(script: Path, *args: str, nproc: int = 2, timeout: float = 120) -> str:
    """Run `script` under torchrun with `nproc` CPU processes; return its output, fail on error."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1",
               MINILLM_DIST_TIMEOUT_S=str(WORKER_TIMEOUT_S))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout
