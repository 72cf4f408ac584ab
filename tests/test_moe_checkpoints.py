"""MoE models by flags and self-describing MoE checkpoints: an MoE run, a MoEfied model and a run
with rectification save, load (the same module tree, equal logits), sample and resume exactly."""

import importlib.util
from pathlib import Path

import pytest
import torch

from minillm.corpus import stdlib_docstrings
from minillm.data import prepare
from minillm.distributed import DistInfo
from minillm.errors import UserError
from minillm.generate import generate_ids
from minillm.hf import save_hf
from minillm.model import GPT, preset
from minillm.checkpoint import load_model, save_model
from minillm.moe import MoE, MoEConfig, active_matmul_params
from minillm.moefy import merge_moe, moefy_ffn
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification
from minillm.tokenizer import train_bpe
from minillm.train import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    docs = list(stdlib_docstrings(max_files=40))
    out = tmp_path_factory.mktemp("data")
    prepare(docs, train_bpe(docs, vocab_size=300), out, val_fraction=0.05, progress=False)
    return out


def config(data_dir, out, **kw):
    base = dict(data=[str(data_dir)], out_dir=str(out), preset="tiny-llama", n_layer=4, n_embd=32,
                block_size=32, batch_size=4, max_steps=8, warmup_steps=1, log_interval=2,
                eval_interval=0, ckpt_interval=4, progress=False, moe_experts=4, moe_top_k=1,
                moe_capacity_factor=1.0, moe_rectify=["intra", "fill"], moe_devices=2)
    return TrainConfig(**{**base, **kw})


def transforms():
    return [IntraGPURectification(num_devices=2), FillInRectification()]


def test_an_moe_run_with_rectification_loads_samples_and_resumes_exactly(data_dir, tmp_path):
    full = Trainer(config(data_dir, tmp_path / "full"), DistInfo(), plan_transforms=transforms())
    assert [type(b.ffn).__name__ for b in full.model.blocks] == ["DenseFFN", "MoE", "DenseFFN", "MoE"]
    history = full.train()
    assert "moe_balance" in history[0]

    model, tok, _ = load_model(tmp_path / "full" / "ckpt_0000008.pt")
    moe = model.blocks[1].ffn
    assert isinstance(moe, MoE) and moe.cfg.num_experts == 4 and moe.cfg.top_k == 1
    assert [type(t) for t in moe.plan_transforms] == [IntraGPURectification, FillInRectification]
    assert moe.plan_transforms[0].num_devices == 2
    x = torch.randint(0, 300, (2, 32))
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x).logits, full.model(x).logits)
    prompts = [[5, 6, 7], [8]]
    assert generate_ids(model, prompts, 6, temperature=0) == generate_ids(full.model, prompts, 6,
                                                                             temperature=0)

    class Kill:
        def on_step_end(self, trainer, record):
            if trainer.step == 6:
                raise KeyboardInterrupt

    first = Trainer(config(data_dir, tmp_path / "split"), DistInfo(), plan_transforms=transforms(),
                    callbacks=[Kill()])
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = Trainer(config(data_dir, tmp_path / "split", resume=True), DistInfo(),
                      plan_transforms=transforms())
    assert resumed.step == 4
    assert [h["loss"] for h in resumed.train()] == [h["loss"] for h in history[4:]]


def test_pretrain_script_trains_an_moe_model_by_flags_and_resumes_without_them(data_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "scripts" / "pretrain.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    script.main(["--data", str(data_dir), "--out-dir", str(out), "--preset", "tiny-llama",
                 "--n-layer", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "4",
                 "--max-steps", "2", "--ckpt-interval", "2", "--eval-interval", "0",
                 "--moe-experts", "4", "--moe-top-k", "2", "--moe-layers", "0", "1",
                 "--moe-rectify", "fill", "--progress", "false"])
    script.main(["--out-dir", str(out), "--resume", "true", "--max-steps", "3"])
    model = load_model(out / "ckpt_0000003.pt")[0]
    assert all(isinstance(b.ffn, MoE) for b in model.blocks)
    assert [type(t) for t in model.blocks[0].ffn.plan_transforms] == [FillInRectification]
    with pytest.raises(UserError, match="--moe-top-k 5 with --moe-experts 4"):
        script.main(["--data", str(data_dir), "--out-dir", str(tmp_path / "x"), "--moe-experts",
                     "4", "--moe-top-k", "5"])


def test_a_moefied_model_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = GPT(preset("tiny-gpt", vocab_size=300, n_layer=2, n_embd=32, activation="relu")).eval()
    dense = model.blocks[1].ffn
    model.blocks[1].ffn = moefy_ffn(dense, num_experts=4, top_k=4)
    save_model(tmp_path / "m.pt", model)
    loaded = load_model(tmp_path / "m.pt")[0].eval()
    x = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
    merged = merge_moe(loaded.blocks[1].ffn)
    for name, p in dense.state_dict().items():
        assert torch.equal(merged.state_dict()[name], p), name  # the permutation came back too


def test_flops_count_the_active_experts_only():
    torch.manual_seed(0)
    model = GPT(preset("tiny-gpt", vocab_size=300, n_layer=2, n_embd=32))
    dense_flops = model.flops_per_token(16)
    moe = MoE(32, MoEConfig(num_experts=8, top_k=2, expert_hidden=128, activation="gelu_tanh"))
    dense_ffn = sum(p.numel() for p in model.blocks[1].ffn.parameters())
    model.blocks[1].ffn = moe
    # router 32 x 8 plus two experts of 2 x 32 x 128 weights, instead of the dense FFN
    assert active_matmul_params(moe) == 32 * 8 + 2 * 2 * 32 * 128
    assert model.flops_per_token(16) == dense_flops + 6 * (active_matmul_params(moe) - dense_ffn)


def test_moe_models_refuse_the_hugging_face_layout_by_name(tmp_path):
    model = GPT(preset("tiny-gpt", vocab_size=300, n_layer=2, n_embd=32))
    model.blocks[1].ffn = MoE(32, MoEConfig(num_experts=2, top_k=1, expert_hidden=16))
    with pytest.raises(UserError, match=r"layers \[1\] have Mixture-of-Experts"):
        save_hf(model, tmp_path)


def test_an_ffn_that_cannot_be_described_is_a_named_error():
    model = GPT(preset("tiny-gpt", vocab_size=300, n_layer=2, n_embd=32))
    model.blocks[0].ffn = torch.nn.Identity()
    with pytest.raises(TypeError, match="layer 0's FFN is a Identity"):
        model.describe()


def test_a_checkpoint_written_before_the_methods_moved_still_loads():
    # Saved by main before minillm/rectify_router.py moved to minillm/methods/: its config names
    # the transforms by their old class paths, which resolve through moe.MOVED_CLASSES.
    path = REPO / "tests" / "fixtures" / "premove_moe_rectify.pt"
    old_types = [t["type"] for t in torch.load(path, weights_only=True)["config"]["moe_layers"]["1"]
                 ["plan_transforms"]]
    assert old_types == ["minillm.rectify_router.IntraGPURectification",
                         "minillm.rectify_router.FillInRectification"]
    model, _, extra = load_model(path)
    moe = model.blocks[1].ffn
    assert [type(t) for t in moe.plan_transforms] == [IntraGPURectification, FillInRectification]
    assert moe.plan_transforms[0].num_devices == 2
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(extra["x"]).logits, extra["logits"])
