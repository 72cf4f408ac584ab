"""Sheared-LLaMA: hard-concrete statistics, the Lagrangian reaching the target, compact == masked,
Hugging Face export of the compact model, exact resume of a pruning run, dynamic batch loading."""

import json
import math

import numpy as np
import pytest
import torch

from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.model import GPT, preset
from minillm.methods.sheared import (DynamicBatchLoading, HardConcrete, PruningSchedule, ShearingMasks,
                                     TargetShape, check_hf_exportable, compact, dbl_update, keep_top,
                                     load_reference_losses, magnitude_masks)
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
    with torch.no_grad():
        gate.log_alpha.copy_(torch.tensor([-4.0, -2.0, -1.0, 0.0, 1.0, 2.5, 5.0]))
    z = torch.stack([gate.sample() for _ in range(20_000)])
    assert z.min() == 0 and z.max() == 1  # hard: exact zeros and ones occur
    torch.testing.assert_close((z != 0).float().mean(0), gate.prob_nonzero().detach(), atol=0.012, rtol=0)
    assert gate.prob_nonzero()[-1] > 0.998  # the initial log_alpha keeps (almost) everything


def test_the_lagrangian_drives_expected_sparsity_to_the_target():
    torch.manual_seed(0)
    model = GPT(preset("tiny-llama", **LLAMA))
    target = TargetShape(n_layer=2, n_head=2, n_embd=16, ffn_hidden=24)
    masks = ShearingMasks(model.config, target, mask_lr=0.1, lambda_lr=0.1)
    model.mask_source = masks
    opt = make_optimizer(model, TrainConfig(lr=1e-3), torch.device("cpu"))
    lambda_group = [g for g in opt.param_groups if g.get("maximize")]
    assert len(lambda_group) == 1 and lambda_group[0]["weight_decay"] == 0.0
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups if g.get("own_lr"))
    x = torch.randint(0, 300, (2, 16))
    for step in range(400):
        masks.progress = min(1.0, step / 100)
        out = model(x, x)
        (out.loss + out.aux_losses["lagrangian"]).backward()
        opt.step()
        opt.zero_grad()
    expected = masks.expected_sparsity().detach()
    torch.testing.assert_close(expected, masks.target_sparsity, atol=0.06, rtol=0)


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


def test_the_script_runs_at_a_tiny_size_and_resumes_by_stage(domains, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from minillm.checkpoint import load_model
    spec = importlib.util.spec_from_file_location(
        "sheared_script", Path(__file__).resolve().parents[1] / "scripts" / "sheared.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    argv = ["--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}", f"b={domains / 'b'}",
            "--source-steps", "8", "--prune-steps", "6", "--prune-warmup", "3", "--continue-steps",
            "4", "--block-size", "16", "--batch-size", "4", "--eval-interval", "2",
            "--eval-batches", "1", "--target-n-layer", "2", "--target-n-head", "2",
            "--target-n-embd", "32", "--target-ffn-hidden", "64"]
    script.main(argv)
    first = capsys.readouterr().out
    pruned = load_model(tmp_path / "pruned.pt")[0].config
    assert (pruned.n_layer, pruned.n_head, pruned.n_kv_head, pruned.n_embd, pruned.ffn_hidden) == (2, 2, 1, 32, 64)
    for row in ("source", "sheared + DBL", "sheared, static mix", "magnitude pruned", "from scratch"):
        assert f"\n{row} " in first
    before = (tmp_path / "pruned.pt").stat().st_mtime_ns
    script.main(argv)  # a second run into the same folder reuses the finished stages
    second = capsys.readouterr().out
    assert "--- source" not in second and "--- pruning" not in second
    assert (tmp_path / "pruned.pt").stat().st_mtime_ns == before
    with pytest.raises(UserError, match="target n_embd 999 does not fit"):
        script.main(argv[:-8] + ["--target-n-embd", "999", "--out-dir", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists()


@pytest.mark.slow
def test_the_script_prunes_under_fsdp_on_two_processes(domains, tmp_path):
    from pathlib import Path

    from minillm.checkpoint import load_model
    from tests.distributed import torchrun
    out = torchrun(Path(__file__).resolve().parents[1] / "scripts" / "sheared.py",
                   "--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}", f"b={domains / 'b'}",
                   "--source-steps", "4", "--prune-steps", "4", "--prune-warmup", "2",
                   "--continue-steps", "2", "--block-size", "16", "--batch-size", "2",
                   "--grad-accum", "2", "--eval-interval", "1", "--eval-batches", "1",
                   "--target-n-layer", "2", "--target-n-head", "2", "--target-n-embd", "32",
                   "--target-ffn-hidden", "64", "--fsdp", "true", "--device", "cpu", timeout=240)
    assert "\nmagnitude pruned " in out and "final mixture weights with DBL" in out
    pruned = load_model(tmp_path / "pruned.pt")[0].config
    assert (pruned.n_layer, pruned.n_head, pruned.n_embd, pruned.ffn_hidden) == (2, 2, 32, 64)
    state = torch.load(tmp_path / "prune" / "ckpt_0000004.pt", weights_only=True)
    assert not torch.equal(state["model"]["mask_source.lambda2"], torch.zeros(4))  # maximised


def test_the_script_refuses_to_reuse_stages_made_with_other_settings(domains, tmp_path):
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location(
        "sheared_script", Path(__file__).resolve().parents[1] / "scripts" / "sheared.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "settings.json").write_text(json.dumps({"target_n_embd": 16}))
    with pytest.raises(UserError, match="holds a run with other settings.*--target-n-embd 16 -> 32"):
        script.main(["--out-dir", str(tmp_path), "--domains", f"a={domains / 'a'}",
                     "--target-n-embd", "32"])
