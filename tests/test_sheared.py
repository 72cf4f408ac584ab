"""Sheared-LLaMA: hard-concrete statistics, the in-place clamp, the per-row Lagrangian by hand, a
tiny pruning run ending on target, compact == masked, Hugging Face export of the compact model,
exact resume of a pruning run, dynamic batch loading, the script's table and errors."""

import json
import math

import numpy as np
import pytest
import torch

from minillm.checkpoint import load_model
from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.model import GPT, ModelConfig, preset
from minillm.methods.sheared import (BETA, DynamicBatchLoading, HardConcrete, PruningSchedule,
                                     ShearingMasks, TargetShape, check_hf_exportable, compact,
                                     dbl_update, keep_top, load_reference_losses, magnitude_masks)
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer, make_optimizer

LLAMA = dict(vocab_size=300, block_size=32, n_layer=4, n_head=4, n_kv_head=2, n_embd=32,
             ffn_hidden=48)
GPT2 = dict(vocab_size=300, block_size=32, n_layer=4, n_head=4, n_embd=32)


def model_of(kind, seed=0):
    torch.manual_seed(seed)
    return GPT(preset("tiny-llama", **LLAMA) if kind == "llama" else preset("tiny-gpt", **GPT2)).eval()


def trained_masks(model, target, seed=1):
    """ShearingMasks with scattered log_alphas, as after some pruning steps."""
    torch.manual_seed(seed)
    masks = ShearingMasks(model.config, target)
    with torch.no_grad():
        for gate in masks.gates.values():
            gate.log_alpha.copy_(torch.randn_like(gate.log_alpha) * 3)
    return masks


def test_sampled_gates_match_the_closed_form_probability_of_being_nonzero():
    torch.manual_seed(0)
    gate = HardConcrete((7,))
    torch.testing.assert_close(gate.log_alpha.detach(), torch.full((7,), math.log(100.0)))  # 5, clamped
    assert gate.prob_nonzero().min() > 0.997  # the initial log_alpha keeps (almost) everything
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.5, 4.0]))
    z = torch.stack([gate.sample() for _ in range(20_000)])
    assert z.min() == 0 and z.max() == 1  # hard: exact zeros and ones occur
    torch.testing.assert_close((z != 0).float().mean(0), gate.prob_nonzero().detach(), atol=0.012, rtol=0)
    # eval-mode gates (the authors' deterministic z): the round(expected non-zero) highest stay
    expected_kept = int(gate.prob_nonzero().sum().round())
    kept = gate.deterministic()
    assert (kept != 0).tolist() == [False] * (7 - expected_kept) + [True] * expected_kept


def test_log_alpha_is_clamped_in_place_and_keeps_its_gradient():
    gate = HardConcrete((3,))
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-7.0, 0.0, 7.0]))
    gate.constrain_()
    assert gate.log_alpha.tolist() == pytest.approx([math.log(0.01), 0.0, math.log(100.0)])
    gate.row_sparsity().sum().backward()
    assert (gate.log_alpha.grad != 0).all()  # a clamp in the forward pass would zero the ends


def test_the_lagrangian_is_taken_per_row_as_by_hand():
    """P(z != 0) = 1 - sigmoid(c - log_alpha), c = beta log(1/11): log_alpha = c + log 3 gives 3/4,
    c gives 1/2, c - log 3 gives 1/4, so each row's expected sparsity is a simple fraction."""
    source = ModelConfig(vocab_size=8, n_layer=2, n_head=2, n_kv_head=2, n_embd=4, head_dim=2,
                         ffn_hidden=2)
    masks = ShearingMasks(source, TargetShape(n_layer=1, n_head=1, n_embd=2, ffn_hidden=1))
    c, up, down = BETA * math.log(1 / 11), BETA * math.log(1 / 11) + math.log(3), BETA * math.log(1 / 11) - math.log(3)
    log_alphas = {"layer": [up, down],                  # sparsity 1/2
                  "head": [[c, c], [up, up]],           # rows 1/2, 1/4
                  "ffn": [[down, down], [c, down]],     # rows 3/4, 5/8
                  "hidden": [up, up, up, up]}           # 1/4
    with torch.no_grad():
        for kind, value in log_alphas.items():
            masks.gates[kind].log_alpha.copy_(torch.tensor(value))
        masks.lambda1.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        masks.lambda2.copy_(torch.tensor([8.0, 4.0, 2.0, 1.0]))
    rows = masks.row_sparsity()
    torch.testing.assert_close(rows["ffn"], torch.tensor([0.75, 0.625]))
    # every target is 1/2; gaps per row: layer [0], head [0, -1/4], ffn [1/4, 1/8], hidden [-1/4]
    by_hand = (0.0
               + (0.0 + (2 * -0.25 + 4 * 0.0625)) / 2
               + ((3 * 0.25 + 2 * 0.0625) + (3 * 0.125 + 2 * 0.015625)) / 2
               + (4 * -0.25 + 1 * 0.0625))
    assert masks.lagrangian().item() == pytest.approx(by_hand) == pytest.approx(-0.421875)
    masks.progress = 0.5  # during the warm-up the target is half way: 1/4 for every kind
    head = (2 * 0.25 + 4 * 0.0625 + 0.0) / 2
    ffn = ((3 * 0.5 + 2 * 0.25) + (3 * 0.375 + 2 * 0.140625)) / 2
    assert masks.lagrangian().item() == pytest.approx(1 * 0.25 + 8 * 0.0625 + head + ffn + 0.0)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compact_equals_masked(kind):
    model = model_of(kind)
    target = TargetShape(n_layer=3, n_head=2, n_embd=20, ffn_hidden=24)
    final = trained_masks(model, target).final_masks()
    assert final.layer.count_nonzero() == 3 and (final.ffn.count_nonzero(1)[final.layer != 0] == 24).all()
    assert set(final.layer.unique().tolist()) - {0.0, 1.0}  # fractional values get folded
    small = compact(model, final)
    cfg = small.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.ffn_hidden) == (3, 2, 20, 24)
    assert cfg.n_kv_head == (1 if kind == "llama" else 2)
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits, model(x, masks=final).logits, atol=1e-5, rtol=1e-5)
    assert small.num_params() < model.num_params()


def test_magnitude_masks_have_the_target_shape_and_compact():
    model = model_of("llama")
    target = TargetShape(n_layer=2, n_head=2, n_embd=16, ffn_hidden=24)
    small = compact(model, magnitude_masks(model, target))
    assert (small.config.n_layer, small.config.n_head, small.config.n_embd) == (2, 2, 16)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_the_exported_compact_model_loads_in_transformers_with_equal_logits(kind, tmp_path):
    transformers = pytest.importorskip("transformers")
    from minillm.hf import save_hf
    model = model_of(kind)
    target = TargetShape(n_layer=2, n_head=2, n_embd=16, ffn_hidden=24)  # 2 heads x 8 = 16
    small = compact(model, trained_masks(model, target).final_masks())
    check_hf_exportable(small.config)
    save_hf(small, tmp_path)
    cls = transformers.LlamaForCausalLM if kind == "llama" else transformers.GPT2LMHeadModel
    hf = cls.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, small(x).logits, atol=1e-4, rtol=1e-4)


def test_a_gpt2_shape_without_a_hf_layout_is_a_named_refusal():
    model = model_of("gpt2")
    small = compact(model, trained_masks(model, TargetShape(2, 2, 24, 24)).final_masks())
    with pytest.raises(UserError, match="n_head 2 x head_dim 8 != n_embd 24 cannot be saved"):
        check_hf_exportable(small.config)


@pytest.mark.parametrize("target, message", [
    (TargetShape(5, 2, 16, 24), "target n_layer 5 does not fit the source model's 4"),
    (TargetShape(2, 3, 16, 24), "n_head 3 is not a multiple of the source's 2 query heads"),
    (TargetShape(2, 2, 16, 24, n_kv_head=2), "n_kv_head 2 with n_head 2 changes the source's group"),
    (TargetShape(2, 2, 64, 24), "target n_embd 64 does not fit"),
])
def test_a_target_that_does_not_fit_is_a_named_error(target, message):
    with pytest.raises(UserError, match=message):
        ShearingMasks(model_of("llama").config, target)


def test_keep_top_breaks_ties_by_index():
    assert keep_top(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2).tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert keep_top(torch.tensor([[1.0, 1.0, 1.0]]), 2).tolist() == [[1.0, 1.0, 0.0]]


# --- in the trainer --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    docs = list(stdlib_docstrings(max_files=60))
    tok = train_bpe(docs, vocab_size=300)
    root = tmp_path_factory.mktemp("domains")
    prepare(docs[::2], tok, root / "a", val_fraction=0.05, progress=False)
    prepare([d.upper() for d in docs[1::2]], tok, root / "b", val_fraction=0.05, progress=False)
    return root


def pruning_run(domains, out, callbacks_of, **kw):
    base = dict(data=[f"a={domains / 'a'}", f"b={domains / 'b'}"], out_dir=str(out),
                preset="tiny-llama", n_layer=2, n_embd=32, n_head=4, block_size=32, batch_size=4,
                max_steps=8, warmup_steps=1, log_interval=2, eval_interval=0, ckpt_interval=4,
                progress=False)
    cfg = TrainConfig(**{**base, **kw})
    target = TargetShape(n_layer=1, n_head=2, n_embd=16, ffn_hidden=32)
    holder = {}

    def attach(model):
        holder["masks"] = model.mask_source = ShearingMasks(model.config, target)
        return model

    trainer = Trainer(cfg, DistInfo(), model_transform=attach)
    trainer.callbacks = callbacks_of(holder["masks"])
    return trainer


def test_a_tiny_pruning_run_ends_on_target(domains, tmp_path):
    trainer = pruning_run(domains, tmp_path, lambda m: [PruningSchedule(m, 30)], max_steps=150,
                          log_interval=50, ckpt_interval=150, lr=1e-3)
    masks = trainer.callbacks[0].masks
    groups = [g for g in trainer.optimizer.param_groups if g.get("own_lr")]
    assert [g["peak_lr"] for g in groups] == [1.0, 1.0] and [g.get("maximize", False) for g in groups] == [False, True]
    assert all(g["weight_decay"] == 0.0 for g in groups)
    history = trainer.train()
    # the masks' lr followed the schedule: at the last step, the cosine's end of 0.1 x lr
    assert groups[0]["lr"] == pytest.approx(history[-1]["lr"] / 1e-3)
    assert masks.off_target(0.02) == {}, masks.row_sparsity()
    last = history[-1]
    for i, kind in enumerate(("layer", "head", "ffn", "hidden")):
        assert last[f"target/{kind}"] == pytest.approx(float(masks.target_sparsity[i]))
        assert last[f"worst_gap/{kind}"] <= 0.02
    assert all(masks.gates[k].log_alpha.abs().max() <= math.log(100) + 1e-6 for k in masks.gates)
    small = compact(trainer.model, masks.final_masks())
    assert (small.config.n_layer, small.config.n_head, small.config.n_embd, small.config.ffn_hidden) == (1, 2, 16, 32)


def test_a_pruning_run_resumes_exactly(domains, tmp_path):
    full = pruning_run(domains, tmp_path / "full", lambda m: [PruningSchedule(m, 4)]).train()

    class Kill:
        def on_step_end(self, trainer, record):
            if trainer.step == 6:
                raise KeyboardInterrupt

    first = pruning_run(domains, tmp_path / "split", lambda m: [PruningSchedule(m, 4), Kill()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = pruning_run(domains, tmp_path / "split", lambda m: [PruningSchedule(m, 4)], resume=True)
    assert resumed.step == 4
    tail = resumed.train()
    assert [h["loss"] for h in tail] == [h["loss"] for h in full[4:]]
    assert [h["lagrangian"] for h in tail] == [h["lagrangian"] for h in full[4:]]
    assert "sparsity/head" in full[-1]
    state = torch.load(tmp_path / "full" / "ckpt_0000008.pt", weights_only=True)
    assert "mask_source.lambda1" in state["model"]


def test_dbl_update_by_hand():
    w = np.array([0.5, 0.3, 0.2])
    got = dbl_update(w, np.array([3.0, 2.0, 1.0]), np.array([2.0, 2.5, 1.0]), eta=1.0, smoothing=0.0)
    expected = np.array([0.5 * math.e, 0.3, 0.2]) / (0.5 * math.e + 0.5)
    np.testing.assert_allclose(got, expected)
    unclipped = dbl_update(w, np.array([3.0, 2.0, 1.0]), np.array([2.0, 2.5, 1.0]), smoothing=0.0, clip=False)
    assert unclipped[1] < got[1]  # below its reference, the unclipped form down-weights a domain
    smoothed = dbl_update(np.array([1.0 - 1e-12, 1e-12]), np.array([1.0, 1.0]), np.array([0.0, 5.0]),
                          smoothing=0.1)
    assert smoothed[1] >= 0.05


def test_dynamic_batch_loading_upweights_the_domain_above_its_reference(domains, tmp_path):
    dbl = DynamicBatchLoading({"a": 100.0, "b": 0.0})  # b is always far above its reference
    trainer = pruning_run(domains, tmp_path, lambda m: [dbl], eval_interval=2, eval_batches=1)
    trainer.train()
    assert trainer.loader.weights[1] > 0.99
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("dbl_weight/b" in r for r in logged)


def test_reference_losses_file_errors(tmp_path):
    path = tmp_path / "ref.json"
    path.write_text('{"a": 2.0}')
    with pytest.raises(UserError, match="no reference loss for domain\\(s\\) b"):
        load_reference_losses(path, ["a", "b"])
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="expected a JSON object"):
        load_reference_losses(path, ["a"])
    path.write_text('{"a": "x"}')
    with pytest.raises(UserError, match="reference loss of a is not a finite number"):
        load_reference_losses(path, ["a"])
    assert load_reference_losses(tmp_path / "ref.json", []) == {}


def load_script():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "sheared_script", Path(__file__).resolve().parents[1] / "scripts" / "sheared.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_script_runs_at_a_tiny_size_and_resumes_by_stage(domains, tmp_path, capsys):
    script = load_script()
    argv = ["--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}", f"b={domains / 'b'}",
            "--source-steps", "8", "--prune-steps", "6", "--continue-steps", "4", "--seeds", "0",
            "--block-size", "16", "--batch-size", "4", "--eval-interval", "2", "--eval-batches", "1",
            "--target-n-layer", "2", "--target-n-head", "2", "--target-n-embd", "32",
            "--target-ffn-hidden", "64"]
    script.main(argv)
    first = capsys.readouterr().out
    pruned, _, extra = load_model(tmp_path / "seed0" / "pruned.pt")
    cfg = pruned.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_kv_head, cfg.n_embd, cfg.ffn_hidden) == (2, 2, 1, 32, 64)
    assert set(extra["row_sparsity"]) == {"layer", "head", "ffn", "hidden"}
    for row in ("source", "sheared + DBL", "sheared, static mix", "magnitude pruned", "from scratch"):
        assert f"\n{row} " in first
    # six steps cannot reach the target: the table and a closing line say so
    assert "NO (" in first and "pruning did NOT end on target" in first
    assert "    step     6  layer " in first  # the sparsity trace of the pruning run
    before = (tmp_path / "seed0" / "pruned.pt").stat().st_mtime_ns
    script.main(argv)  # a second run into the same folder reuses the finished stages
    second = capsys.readouterr().out
    assert "--- source" not in second and "--- pruning" not in second
    assert (tmp_path / "seed0" / "pruned.pt").stat().st_mtime_ns == before
    assert second.split("\nshape:")[1].splitlines()[:11] == first.split("\nshape:")[1].splitlines()[:11]
    with pytest.raises(UserError, match="target n_embd 999 does not fit"):
        script.main(argv[:-8] + ["--target-n-embd", "999", "--out-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--threads", "0", "--threads 0: expected at least 1"),
    ("--lr", "0", "--lr 0.0: expected a positive number"),
    ("--prune-warmup-fraction", "1.5", "--prune-warmup-fraction 1.5: expected 0 to 1"),
    ("--prune-steps", "3", "--prune-steps 3 x --prune-batch-size 2 is not a multiple of --batch-size 16"),
    ("--seeds", "1 1", "--seeds \\[1, 1\\]: expected one or more distinct seeds"),
])
def test_the_script_refuses_bad_values_by_name(tmp_path, flag, value, message):
    with pytest.raises(UserError, match=message):
        load_script().main(["--out-dir", str(tmp_path), flag, *value.split()])
    assert not tmp_path.joinpath("settings.json").exists()


@pytest.mark.slow
def test_the_script_prunes_under_fsdp_on_two_processes(domains, tmp_path):
    from pathlib import Path

    from tests.distributed import torchrun
    out = torchrun(Path(__file__).resolve().parents[1] / "scripts" / "sheared.py",
                   "--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}", f"b={domains / 'b'}",
                   "--source-steps", "4", "--prune-steps", "4", "--seeds", "0",
                   "--continue-steps", "2", "--block-size", "16", "--batch-size", "2",
                   "--grad-accum", "2", "--eval-interval", "1", "--eval-batches", "1",
                   "--target-n-layer", "2", "--target-n-head", "2", "--target-n-embd", "32",
                   "--target-ffn-hidden", "64", "--fsdp", "true", "--device", "cpu", timeout=240)
    assert "\nmagnitude pruned " in out and "final mixture weights with DBL" in out
    pruned = load_model(tmp_path / "seed0" / "pruned.pt")[0].config
    assert (pruned.n_layer, pruned.n_head, pruned.n_embd, pruned.ffn_hidden) == (2, 2, 32, 64)
    state = torch.load(tmp_path / "seed0" / "prune" / "ckpt_0000004.pt", weights_only=True)
    assert not torch.equal(state["model"]["mask_source.lambda2"], torch.zeros(4))  # maximised
    for kind in ("layer", "head", "ffn", "hidden"):  # the in-place clamp also holds the shards
        assert state["model"][f"mask_source.gates.{kind}.log_alpha"].abs().max() <= math.log(100) + 1e-6


def test_the_script_refuses_to_reuse_stages_made_with_other_settings(domains, tmp_path):
    script = load_script()
    (tmp_path / "settings.json").write_text(json.dumps({"target_n_embd": 16}))
    with pytest.raises(UserError, match="holds a run with other settings.*--target-n-embd 16 -> 32"):
        script.main(["--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}",
                     "--target-n-embd", "32"])
