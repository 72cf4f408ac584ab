"""The trainer never saves a broken state and never throws a run away: non-finite steps are
skipped on the device or stop the run, resume refuses an unreadable run, flags and data are checked
before anything is written, and a resumed run takes its model from the checkpoint."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm.cli import given_fields
from minillm.corpus import stdlib_docstrings
from minillm.data import DataError, TokenDataset, eval_batches, prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError, run_main
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer, peak_flops_of
from minillm.checkpoint import checkpoints

REPO = Path(__file__).resolve().parents[1]


def pretrain_main():
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "scripts" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture(scope="module")
def corpus():
    docs = list(stdlib_docstrings(max_files=60))
    return docs, train_bpe(docs, vocab_size=512)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, corpus):
    docs, tok = corpus
    out = tmp_path_factory.mktemp("data")
    prepare(docs, tok, out, val_fraction=0.05, progress=False)
    return out


def config(data_dir, out_dir, **kw):
    base = dict(data=[str(data_dir)], out_dir=str(out_dir), preset="tiny-gpt", block_size=32,
                batch_size=4, max_steps=4, warmup_steps=1, eval_interval=0, ckpt_interval=0,
                log_interval=1, progress=False)
    return TrainConfig(**{**base, **kw})


def strict_json_lines(path):
    """Every line parses as JSON without NaN / Infinity (which are not JSON)."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


class NaNGradientAt:
    """Makes the gradient of one parameter NaN during the given step (1-based), loss left finite."""

    def __init__(self, step: int):
        self.step, self.params = step, []

    def on_step_start(self, trainer):
        if trainer.step + 1 == self.step:
            p = trainer.model.lm_head.weight
            self.handle = p.register_hook(lambda g: torch.full_like(g, float("nan")))
        elif hasattr(self, "handle"):
            self.handle.remove()

    def on_step_end(self, trainer, record):
        self.params.append({k: v.clone() for k, v in trainer.model.state_dict().items()})


# --- non-finite steps -------------------------------------------------------------------------------

def test_a_nan_gradient_skips_the_step_and_is_logged_as_null(data_dir, tmp_path):
    hook = NaNGradientAt(step=2)
    trainer = Trainer(config(data_dir, tmp_path, ckpt_interval=2), DistInfo(), callbacks=[hook])
    history = trainer.train()
    assert math.isfinite(history[1]["loss"]) and math.isnan(history[1]["grad_norm"])
    for name, before in hook.params[0].items():  # step 2 changed nothing
        assert torch.equal(hook.params[1][name], before), name
    assert any(not torch.equal(hook.params[2][k], v) for k, v in hook.params[1].items())
    adam_steps = {float(s["step"]) for s in trainer.optimizer.state.values()}
    assert adam_steps == {3.0}  # 4 steps, one skipped: AdamW's bias correction did not advance
    metrics = strict_json_lines(tmp_path / "metrics.jsonl")
    assert metrics[1]["grad_norm"] is None and metrics[1]["skipped_steps"] == 1
    assert metrics[-1]["skipped_steps"] == 1
    state = torch.load(tmp_path / "ckpt_0000002.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert state["skipped_steps"] == 1


def test_stop_mode_never_writes_the_bad_step_and_names_a_good_checkpoint(data_dir, tmp_path):
    trainer = Trainer(config(data_dir, tmp_path, ckpt_interval=1, log_interval=4,
                             max_skipped_steps=0), DistInfo(), callbacks=[NaNGradientAt(step=2)])
    with pytest.raises(FloatingPointError, match=r"1 step\(s\).*latest: step 2.*"
                                                 r"last good checkpoint is .*ckpt_0000001\.pt"):
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("ckpt_*.pt")) == ["ckpt_0000001.pt"]


def test_a_diverging_run_never_saves_a_non_finite_checkpoint(data_dir, tmp_path):
    """The issue's reproduction: --lr 1e2 --warmup-steps 5 --ckpt-interval 2 --eval-interval 2."""
    cfg = config(data_dir, tmp_path, lr=1e2, warmup_steps=5, ckpt_interval=2, eval_interval=2,
                 eval_batches=2, max_steps=30, keep_checkpoints=0)
    with pytest.raises(FloatingPointError) as err:
        Trainer(cfg, DistInfo()).train()
    saved = sorted(tmp_path.glob("ckpt_*.pt"))
    for path in saved:
        state = torch.load(path, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values()), path.name
    named = str(err.value)
    assert (saved[-1].name in named) if saved else "No checkpoint was written" in named
    records = strict_json_lines(tmp_path / "metrics.jsonl")
    assert any(r.get("skipped_steps") for r in records)


# --- resume -----------------------------------------------------------------------------------------

def test_resume_with_only_unreadable_checkpoints_touches_nothing(data_dir, tmp_path):
    Trainer(config(data_dir, tmp_path, ckpt_interval=4), DistInfo()).train()
    ckpt = tmp_path / "ckpt_0000004.pt"
    ckpt.write_bytes(np.random.default_rng(0).bytes(5000))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UserError, match="no checkpoint that loads.*ckpt_0000004.pt: unreadable.*"
                                        "nothing was changed.*--overwrite true"):
        Trainer(config(data_dir, tmp_path, resume=True), DistInfo())
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_resume_in_an_empty_folder_starts_from_step_0(data_dir, tmp_path):
    assert Trainer(config(data_dir, tmp_path / "new", resume=True), DistInfo()).step == 0


def test_resume_takes_the_model_and_settings_from_the_checkpoint(data_dir, tmp_path):
    main = pretrain_main()
    out = tmp_path / "run"
    main(["--data", str(data_dir), "--out-dir", str(out), "--preset", "tiny-llama", "--block-size",
          "32", "--batch-size", "4", "--max-steps", "4", "--ckpt-interval", "4", "--eval-interval",
          "0", "--progress", "false"])
    # exactly as DESIGN.md (Training, resume) writes it: no --preset, and --max-steps may change
    main(["--data", str(data_dir), "--out-dir", str(out), "--resume", "true", "--max-steps", "6"])
    state = torch.load(out / "ckpt_0000006.pt", weights_only=True)
    assert state["model_config"]["norm"] == "rmsnorm" and state["train_config"]["max_steps"] == 6
    assert state["train_config"]["batch_size"] == 4  # kept from the checkpoint, not the default 16
    with pytest.raises(UserError, match="--block-size 64 contradicts the run being resumed.*has 32"):
        main(["--out-dir", str(out), "--resume", "true", "--block-size", "64"])


def test_given_fields_are_the_flags_on_the_command_line():
    assert given_fields(TrainConfig, ["--max-steps", "5", "--data", "a", "b"]) == {"max_steps", "data"}
    assert given_fields(TrainConfig, []) == set()


# --- flags and data, checked before anything is written -------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(schedule="linear"), "--schedule must be cosine or wsd, got 'linear'"),
    (dict(batch_size=0), "--batch-size must be at least 1, got 0"),
    (dict(block_size=0), "--block-size must be at least 1, got 0"),
    (dict(max_steps=-5), "--max-steps must be at least 1, got -5"),
    (dict(lr=float("nan")), "--lr must be a positive number"),
    (dict(resume=True, overwrite=True), "--resume and --overwrite contradict"),
    (dict(preset="tiny-gtp"), "unknown preset 'tiny-gtp'; choose from"),
    (dict(grad_accum=3, warmup_steps=-1), "--warmup-steps must be 0 or more"),
])
def test_bad_flags_are_refused_before_anything_is_written(data_dir, tmp_path, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Trainer(config(data_dir, tmp_path / "out", **flags), DistInfo())
    assert not (tmp_path / "out").exists()


def test_shards_beyond_the_tokenizers_vocabulary_are_refused(data_dir, tmp_path, corpus):
    docs, _ = corpus
    small = train_bpe(docs[:20], vocab_size=300)
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for path in data_dir.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    small.save(folder / "tokenizer.json")
    with pytest.raises(DataError, match="vocabulary of 512 ids, the model has 300"):
        Trainer(config(folder, tmp_path / "out"), DistInfo())


def test_missing_data_folder_names_prepare_data(tmp_path):
    with pytest.raises(DataError, match="does not exist: make it with scripts/prepare_data.py"):
        Trainer(config(tmp_path / "nope", tmp_path / "out"), DistInfo())
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "book.txt").write_text("some text")
    with pytest.raises(DataError, match="raw text \\(book.txt\\): run scripts/prepare_data.py"):
        Trainer(config(raw, tmp_path / "out"), DistInfo())


def test_data_without_a_val_split_trains_when_not_evaluating(corpus, tmp_path):
    docs, tok = corpus
    prepare(docs, tok, tmp_path / "noval", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="needs a validation split.*--eval-interval 0"):
        Trainer(config(tmp_path / "noval", tmp_path / "a", eval_interval=2), DistInfo())
    history = Trainer(config(tmp_path / "noval", tmp_path / "b"), DistInfo()).train()
    assert len(history) == 4


def test_a_val_split_smaller_than_a_batch_still_evaluates(corpus, tmp_path):
    docs, tok = corpus
    prepare(docs[:400], tok, tmp_path / "d", val_fraction=0.005, progress=False)
    val = TokenDataset(tmp_path / "d", "val")
    windows = (len(val) - 1) // 32
    assert 0 < windows < 64  # fewer windows than the batch below
    trainer = Trainer(config(tmp_path / "d", tmp_path / "o", batch_size=64, eval_interval=1,
                             max_steps=1), DistInfo())
    assert math.isfinite(trainer.evaluate()["val_loss"])


def test_scripts_answer_a_mistake_in_one_line(data_dir, tmp_path, capsys):
    main = pretrain_main()
    for argv, expected in [
        (["--data", str(tmp_path / "missing")], "does not exist: make it with scripts/prepare_data.py"),
        (["--data", str(data_dir), "--device", "cuda:0" if not torch.cuda.is_available() else "tpu"],
         "--device"),
        (["--data", str(data_dir), "--preset", "nope"], "unknown preset 'nope'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            run_main(main, argv + ["--out-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and expected in err, err


# --- evaluation ------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", [2, 3, 5])
def test_evaluation_windows_do_not_depend_on_the_number_of_processes(data_dir, world_size):
    val = TokenDataset(data_dir, "val")

    def windows(world):
        rows, batches = [], []
        for rank in range(world):
            got = list(eval_batches(val, 16, 4, max_windows=13, rank=rank, world_size=world))
            batches.append(len(got))
            rows += [tuple(x[i].tolist()) for x, _, n in got for i in range(n)]
        return sorted(rows), batches

    single, _ = windows(1)
    multi, batches = windows(world_size)
    assert len(single) == 13 and multi == single
    assert len(set(batches)) == 1  # every rank runs the same number of forward passes


def test_tokenizer_special_token_error_speaks_minillm(corpus):
    _, tok = corpus
    with pytest.raises(ValueError, match="allowed_special=\\{'<\\|endoftext\\|>'\\}.*encode_ordinary"):
        tok.encode("a <|endoftext|> b")
    assert tok.encode("a <|endoftext|>", allowed_special="all")[-1] == tok.eot_id


# --- found in review -------------------------------------------------------------------------------

def test_pruning_after_resume_keeps_a_loadable_checkpoint(data_dir, tmp_path):
    Trainer(config(data_dir, tmp_path, max_steps=8, ckpt_interval=4, keep_checkpoints=0),
            DistInfo()).train()
    (tmp_path / "ckpt_0000008.pt").write_bytes(b"damaged")
    resumed = Trainer(config(data_dir, tmp_path, max_steps=6, ckpt_interval=6, keep_checkpoints=1,
                             resume=True), DistInfo())
    assert resumed.step == 4 and (tmp_path / "ckpt_0000008.pt.damaged").is_file()
    resumed.train()
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_0000006.pt"]
    again = Trainer(config(data_dir, tmp_path, max_steps=8, keep_checkpoints=1, resume=True), DistInfo())
    assert again.step == 6


def test_optimizer_settings_changed_on_resume_take_effect(data_dir, tmp_path):
    Trainer(config(data_dir, tmp_path, ckpt_interval=4), DistInfo()).train()
    resumed = Trainer(config(data_dir, tmp_path, max_steps=6, weight_decay=0.0, beta2=0.99,
                             resume=True), DistInfo())
    groups = [g for g in resumed.optimizer.param_groups if not g.get("own_lr")]
    assert all(g["betas"] == (0.9, 0.99) for g in groups)
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]


def test_checkpoints_sort_by_step_not_by_name(tmp_path):
    for step in (9_999_999, 10_000_000, 5):
        (tmp_path / f"ckpt_{step:07d}.pt").write_bytes(b"")
    assert [p.name for p in checkpoints(tmp_path)] == ["ckpt_0000005.pt", "ckpt_9999999.pt",
                                                        "ckpt_10000000.pt"]


def test_peak_flops_match_whole_device_names():
    assert peak_flops_of("NVIDIA L4") == 121e12 and peak_flops_of("NVIDIA L40") is None
    assert peak_flops_of("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_of("NVIDIA H100 PCIe") == 756e12


@pytest.mark.parametrize("flags, message", [
    (dict(moe_experts=4, moe_devices=0), "--moe-devices and --moe-expert-hidden must be at least 1"),
    (dict(grad_clip=float("nan")), "--grad-clip must be a finite number"),
    (dict(moe_layers=[1]), "--moe-layers / --moe-rectify need --moe-experts"),
])
def test_more_bad_flags(data_dir, tmp_path, flags, message):
    with pytest.raises(UserError, match=message):
        Trainer(config(data_dir, tmp_path / "out", **flags), DistInfo())


# --- the command line: one line for every mistake (scripts/pretrain.py in a subprocess) -------------

def run_pretrain(args, cwd):
    import subprocess
    import sys
    return subprocess.run([sys.executable, str(REPO / "scripts" / "pretrain.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_command_line_mistakes_are_one_error_line_that_changes_nothing(data_dir, tmp_path):
    small = ["--data", str(data_dir), "--block-size", "32", "--batch-size", "4", "--progress", "false"]
    out = tmp_path / "run"
    assert run_pretrain(small + ["--out-dir", str(out), "--max-steps", "2", "--eval-interval", "0",
                                 "--ckpt-interval", "2"], tmp_path).returncode == 0
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "ckpt_0000004.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "file.txt").write_text("raw text, not a prepared dataset")
    cases = [
        (small + ["--out-dir", str(out), "--max-step", "5"], "unrecognized arguments: --max-step 5"),
        (small + ["--out-dir", str(out), "--max-steps", "abc"], "--max-steps: invalid int value"),
        (small + ["--out-dir", str(out), "--resume", "maybe"], "--resume: expected true or false"),
        (small + ["--out-dir", str(out), "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["--data", str(tmp_path / "file.txt"), "--out-dir", str(tmp_path / "o")],
         "is a file, not a folder"),
        # resuming where every checkpoint is damaged: said first, though the default --data
        # (data/default, relative to the working directory) does not exist there
        (["--out-dir", str(corrupt), "--resume", "true"], "no checkpoint that loads"),
    ]
    for args, expected in cases:
        before = snapshot(tmp_path)
        proc = run_pretrain(args, tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], (args, lines)
        assert "Traceback" not in proc.stderr and snapshot(tmp_path) == before, args


def test_a_diverged_run_is_one_error_line_naming_the_last_good_checkpoint(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_pretrain(["--data", str(data_dir), "--out-dir", str(out), "--block-size", "32",
                         "--batch-size", "4", "--lr", "1e2", "--warmup-steps", "5", "--max-steps",
                         "30", "--ckpt-interval", "2", "--eval-interval", "0", "--log-interval", "1",
                         "--max-skipped-steps", "0", "--progress", "false"], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error:") and "non-finite" in lines[0], lines
    saved = checkpoints(out)
    assert (f"last good checkpoint is {saved[-1]}" if saved else "No checkpoint") in lines[0]
    # the stop writes nothing: no checkpoint and no metrics line for the step that stopped it
    records = strict_json_lines(out / "metrics.jsonl")
    assert all(not r.get("skipped_steps") for r in records)
    last_logged = max(r["step"] for r in records)
    assert not saved or int(saved[-1].stem[5:]) <= last_logged
