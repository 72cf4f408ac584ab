"""Expert parallelism: the MoE layer (minillm/moe.py) sharded over 2 gloo ranks against one process
that routes each rank's tokens as their own group (tests/workers/expert_parallel.py), and the
trainer with --expert-parallel 2 (tests/workers/train_expert_parallel.py)."""

from pathlib import Path

import pytest

from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer
from tests.distributed import torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.mark.slow
def test_expert_parallel_layer_equals_one_process_per_rank_group():
    """Outputs, auxiliary losses and all gradients, with and without Rectify-Router's transforms;
    the gradient reduction and global norm; checkpoints under global expert indices."""
    assert "OK" in torchrun(WORKERS / "expert_parallel.py", timeout=180)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    docs = list(stdlib_docstrings(max_files=30))
    out = tmp_path_factory.mktemp("data")
    prepare(docs, train_bpe(docs, vocab_size=300), out, val_fraction=0.05, progress=False)
    return out


@pytest.mark.slow
def test_trainer_with_expert_parallel_2(data_dir, tmp_path):
    """Replicated weights stay identical across ranks, checkpoints hold the gathered model and
    moments, resume is exact, and the sharded run equals the data-parallel one."""
    assert "OK" in torchrun(WORKERS / "train_expert_parallel.py", str(data_dir), str(tmp_path),
                            timeout=300)


@pytest.mark.parametrize("kw, message", [
    (dict(fsdp=True), "FSDP together with expert parallelism"),
    (dict(moe_experts=6), "do not split over --expert-parallel 4"),
    (dict(moe_devices=2), "--moe-devices 2 contradicts --expert-parallel 4"),
    (dict(expert_parallel=0), "--expert-parallel must be at least 1")])
def test_expert_parallel_flags_are_checked(kw, message):
    with pytest.raises(UserError, match=message):
        TrainConfig(**{**dict(moe_experts=8, expert_parallel=4), **kw}).validate()


def test_expert_parallel_needs_the_processes(data_dir, tmp_path):
    with pytest.raises(UserError, match="do not split into groups of 2"):
        Trainer(TrainConfig(data=[str(data_dir)], out_dir=str(tmp_path), moe_experts=4,
                            expert_parallel=2, eval_interval=0, progress=False), DistInfo())
