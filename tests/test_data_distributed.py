from pathlib import Path

import numpy as np
import pytest

from minillm.data import ShardWriter
from tests.distributed import torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.slow
def test_two_ranks_under_torchrun_read_disjoint_halves(tmp_path):
    with ShardWriter(tmp_path, "train", 60_000, None) as w:
        w.add(np.arange(1001))  # 100 windows of 10 + 1 tokens
    torchrun(WORKERS / "loader_ranks.py", str(w.paths[0]), str(tmp_path))
    r0, r1 = (set(np.load(tmp_path / f"rank{r}.npy").tolist()) for r in (0, 1))
    assert len(r0) == len(r1) == 50
    assert not r0 & r1
    assert r0 | r1 == set(range(0, 1000, 10))
