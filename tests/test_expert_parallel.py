"""Expert parallelism (minillm/expert_parallel.py) over 2 gloo ranks against one process."""

from pathlib import Path

import pytest

from tests.distributed import torchrun


@pytest.mark.slow
def test_expert_parallel_equals_single_process(tmp_path):
    """Outputs, token / router / expert gradients, the data-parallel reduction (router and experts
    1.000x the single-process data-parallel reference: issue 10, bug 3) and checkpoints."""
    out = torchrun(Path(__file__).parent / "workers" / "expert_parallel.py", str(tmp_path), timeout=180)
    assert "OK" in out
    assert "router: 1.000x" in out and "w_up: 1.000x" in out and "w_down: 1.000x" in out, out
