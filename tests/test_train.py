import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm.corpus import stdlib_docstrings
from minillm.data import TokenDataset, parse_domains, prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.model import GPT, preset
from minillm.checkpoint import load_model
from minillm.tokenizer import train_bpe
from minillm.train import PEAK_BF16_FLOPS, TrainConfig, Trainer, lr_at, peak_flops
from minillm.checkpoint import latest_checkpoint
from tests.distributed import torchrun

WORKERS = Path(__file__).parent / "workers"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    docs = list(stdlib_docstrings(max_files=60))
    tok = train_bpe(docs, vocab_size=512)
    out = tmp_path_factory.mktemp("data")
    prepare(docs, tok, out, val_fraction=0.05, progress=False)
    return out


def config(data_dir, out_dir, **kw):
    base = dict(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny-gpt", block_size=32,
                batch_size=4, max_steps=12, warmup_steps=2, eval_interval=0, ckpt_interval=0,
                log_interval=4, progress=False)
    return TrainConfig(**{**base, **kw})


def test_schedules():
    cfg = TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    wsd = TrainConfig(lr=1.0, min_lr_ratio=0.0, warmup_steps=10, max_steps=100, schedule="wsd",
                      decay_fraction=0.2)
    assert lr_at(50, wsd) == 1.0 and lr_at(79, wsd) == 1.0
    assert lr_at(90, wsd) == pytest.approx(0.5) and lr_at(100, wsd) == 0.0


def test_loss_falls_below_the_unigram_entropy(data_dir, tmp_path):
    tokens = np.asarray(TokenDataset(data_dir, "train").shards[0])
    freq = np.bincount(tokens) / len(tokens)
    unigram_entropy = -(freq[freq > 0] * np.log(freq[freq > 0])).sum()  # 5.34 nats here
    history = Trainer(config(data_dir, tmp_path, max_steps=250, batch_size=8, lr=1e-3),
                      DistInfo()).train()
    first, last = history[0]["loss"], sum(h["loss"] for h in history[-5:]) / 5
    assert first > math.log(512) - 0.5
    assert last < unigram_entropy - 0.5  # the model uses context, not just token frequencies


def test_interrupted_and_resumed_run_reproduces_the_loss_curve(data_dir, tmp_path):
    full = Trainer(config(data_dir, tmp_path / "full"), DistInfo()).train()

    class KillAtStep7:  # dies two steps after the checkpoint of step 5: steps 6, 7 are lost
        losses = []

        def on_step_end(self, trainer, record):
            self.losses.append(record["loss"])
            if trainer.step == 7:
                raise KeyboardInterrupt

    first = Trainer(config(data_dir, tmp_path / "split", ckpt_interval=5), DistInfo(),
                    callbacks=[KillAtStep7()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(config(data_dir, tmp_path / "split", ckpt_interval=5, resume=True), DistInfo())
    assert resumed.step == 5
    tail = resumed.train()
    assert KillAtStep7.losses[:5] + [h["loss"] for h in tail] == [h["loss"] for h in full]
    metrics = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [4, 8, 12]


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(data_dir, tmp_path, monkeypatch):
    trainer = Trainer(config(data_dir, tmp_path, max_steps=4, ckpt_interval=2), DistInfo())
    trainer.train()
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000002.pt", "ckpt_0000004.pt"]

    def crash(obj, f, *a, **k):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", crash)
    trainer.step = 6
    with pytest.raises(KeyboardInterrupt):
        trainer.save()
    monkeypatch.undo()
    (tmp_path / "ckpt_0000004.pt").with_name("ckpt_0000005.pt").write_bytes(b"garbage")  # damaged
    path, state, _ = latest_checkpoint(tmp_path)
    assert path.name == "ckpt_0000004.pt" and state["step"] == 4


def test_nan_loss_stops_with_a_clear_message(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, max_steps=3, log_interval=1, max_skipped_steps=1),
                      DistInfo())
    with torch.no_grad():
        trainer.model.lm_head.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="2 step.*latest: step 2.*No checkpoint was written"):
        trainer.train()


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_accumulation(data_dir, tmp_path):
    torchrun(WORKERS / "train_ddp.py", str(data_dir), str(tmp_path / "ddp"), timeout=180)
    single = Trainer(config(data_dir, tmp_path / "one", block_size=16, batch_size=2, grad_accum=4,
                            max_steps=3, warmup_steps=1), DistInfo())
    single.train()
    ddp_state = torch.load(tmp_path / "ddp" / "final.pt", weights_only=True)
    for name, p in single.model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, atol=1e-5, rtol=1e-4)
    # Evaluation sees the same windows whatever the number of processes: the 2-rank run's
    # validation loss equals one process evaluating the same weights.
    ddp_val = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
               if "val_loss" in line][-1]["val_loss"]
    single.model.load_state_dict(ddp_state)
    single.val = {"data": TokenDataset(data_dir, "val")}
    single.cfg.eval_batches = 3
    assert single.evaluate()["val_loss"] == pytest.approx(ddp_val, abs=1e-6)


@pytest.mark.slow
def test_fsdp2_full_checkpoint_loads_into_one_process_and_back(data_dir, tmp_path):
    torchrun(WORKERS / "train_fsdp.py", str(data_dir), str(tmp_path), timeout=180)
    saved = torch.load(tmp_path / "logits.pt", weights_only=True)
    model, tok, _ = load_model(tmp_path / "ckpt_0000002.pt")  # one process, no sharding
    x = torch.arange(32).view(2, 16) % 100
    with torch.no_grad():
        single = model.eval()(x).logits
    torch.testing.assert_close(single, saved["trained"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(saved["resumed"], saved["trained"], atol=1e-5, rtol=1e-5)
    assert tok is not None


def test_activation_checkpointing_gives_the_same_gradients(data_dir):
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", vocab_size=512, block_size=32))
    x = torch.randint(0, 512, (2, 32))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.activation_checkpointing = checkpointing
        model(x, x).loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_domains_are_mixed_and_evaluated_separately(data_dir, tmp_path):
    cfg = config(data_dir, tmp_path, data=[f"a={data_dir}:3", f"b={data_dir}:1"], max_steps=4,
                 eval_interval=4, eval_batches=2)

    class WeightsAfterEval:
        def on_eval(self, trainer, result):
            self.result = result
            trainer.loader.set_weights({"a": 0.0, "b": 1.0})  # what dynamic batch loading does

    cb = WeightsAfterEval()
    trainer = Trainer(cfg, DistInfo(), callbacks=[cb])
    trainer.train()
    assert set(cb.result) >= {"val_loss/a", "val_loss/b", "val_ppl/a", "val_loss"}
    assert cb.result["val_loss/a"] == cb.result["val_loss/b"]  # same data, same fixed windows
    assert trainer.loader.weights.tolist() == [0.0, 1.0]
    assert (trainer.loader.next_batch()[2] == 1).all()


def test_domain_specs():
    assert parse_domains(["data/web"]) == {"web": ("data/web", 1.0)}
    assert parse_domains(["w=data/web:0.7", "c=data/code"]) == {"w": ("data/web", 0.7),
                                                                "c": ("data/code", 1.0)}
    with pytest.raises(ValueError, match="given twice"):
        parse_domains(["data/web", "other/web"])


def test_domain_specs_with_equals_and_colons_in_paths(tmp_path):
    assert parse_domains(["data/a=b"]) == {"a=b": ("data/a=b", 1.0)}  # '=' after a '/' is the path's
    assert parse_domains(["web=data/x=y:0.5"]) == {"web": ("data/x=y", 0.5)}
    assert parse_domains(["c=data/v:2"]) == {"c": ("data/v", 2.0)}
    existing = tmp_path / "k=v:3"
    existing.mkdir()
    assert parse_domains([str(existing)]) == {"k=v:3": (str(existing), 1.0)}  # an existing path wins
    assert parse_domains(["w=data/web:abc"]) == {"w": ("data/web:abc", 1.0)}
    for bad in (["w=data/web:-1"], ["w=data/web:inf"], ["w=data/web:nan"], ["="], ["w="]):
        with pytest.raises(ValueError, match="data spec"):
            parse_domains(bad)


def test_mfu_table():
    assert peak_flops(torch.device("cpu")) is None
    assert dict(PEAK_BF16_FLOPS)["H100"] == 989e12


def test_process_killed_while_writing_leaves_the_previous_checkpoint(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, str(WORKERS / "save_forever.py"), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "1"  # the first checkpoint is complete
        deadline = time.time() + 30
        while not list(tmp_path.glob("*.tmp")) and time.time() < deadline:
            time.sleep(0.001)  # wait until the next one is being written
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    path, state, _ = latest_checkpoint(tmp_path)
    assert path is not None and state["w"].numel() == 25_000_000
    assert list(tmp_path.glob("*.tmp")) or path.name != "ckpt_0000001.pt"  # killed mid-write


@pytest.mark.slow
def test_two_ranks_two_domains_resume_exactly(data_dir, tmp_path):
    assert "OK" in torchrun(WORKERS / "train_resume_ddp.py", str(data_dir), str(tmp_path), timeout=180)


def test_a_fresh_run_refuses_an_earlier_runs_folder(data_dir, tmp_path):
    Trainer(config(data_dir, tmp_path, max_steps=2, ckpt_interval=2), DistInfo()).train()
    with pytest.raises(UserError, match="holds an earlier run.*--resume true.*--overwrite true"):
        Trainer(config(data_dir, tmp_path, max_steps=2), DistInfo())
    fresh = Trainer(config(data_dir, tmp_path, max_steps=1, ckpt_interval=1, overwrite=True), DistInfo())
    assert not list(tmp_path.glob("ckpt_0000002.pt"))
    fresh.train()
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000001.pt"]


def test_resume_survives_a_torn_metrics_line(data_dir, tmp_path):
    Trainer(config(data_dir, tmp_path, max_steps=4, ckpt_interval=4), DistInfo()).train()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # killed mid-write
    resumed = Trainer(config(data_dir, tmp_path, max_steps=6, resume=True), DistInfo())
    assert resumed.step == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [4]
