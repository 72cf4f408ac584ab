"""Expert parallelism: the MoE layer (minillm/moe.py) sharded over 2 gloo ranks against one process
that routes each rank's tokens as their own group (tests/workers/expert_parallel.py)."""

from pathlib import Path

import pytest

from tests.distributed import torchrun


@pytest.mark.slow
def test_expert_parallel_layer_equals_one_process_per_rank_group(tmp_path):
    """Outputs, auxiliary losses and all gradients, with and without Rectify-Router's transforms;
    the gradient reduction and global norm; checkpoints under global expert indices."""
    out = torchrun(Path(__file__).parent / "workers" / "expert_parallel.py", timeout=180)
    assert "OK" in out
