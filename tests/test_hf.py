import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from minillm.hf import load_hf, save_hf  # noqa: E402
from minillm.model import GPT, ModelConfig  # noqa: E402

GPT2_CASES = {
    "tied": dict(n_embd=48, n_layer=2, n_head=4),
    "untied-odd-inner-relu": dict(n_embd=40, n_layer=3, n_head=5, n_inner=70, tie_word_embeddings=False,
                                  activation_function="relu"),
}
LLAMA_CASES = {
    "mha": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4),
    "gqa-tied-bias": dict(hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                          attention_bias=True, mlp_bias=True),
    "head-dim-linear-rope": dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2,
                                 num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3-rope": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        rope_theta=500000.0, max_position_embeddings=256,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def hf_model(kind, kw, seed=0):
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=101, n_positions=64, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=101, **kw))
    for p in model.parameters():  # make norms and biases non-trivial so that their mapping matters
        p.data.add_(0.02 * torch.randn_like(p))
    return model.eval()


CASES = [("gpt2", k, v) for k, v in GPT2_CASES.items()] + [("llama", k, v) for k, v in LLAMA_CASES.items()]


@pytest.mark.parametrize("kind,name,kw", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_hf_checkpoint_loads_with_equal_logits(tmp_path, kind, name, kw):
    ref = hf_model(kind, kw)
    ref.save_pretrained(tmp_path)
    model = load_hf(tmp_path)
    x = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    x = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


def test_pytorch_model_bin(tmp_path):
    ref = hf_model("gpt2", GPT2_CASES["tied"])
    sd = {k: v for k, v in ref.state_dict().items()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    x = torch.randint(0, 101, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_hf(tmp_path)(x).logits, ref(x).logits, atol=1e-4, rtol=1e-4)


MINILLM_CASES = {
    "gpt2": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32, ffn_hidden=60),
    "gpt2-untied-gelu": dict(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32,
                             activation="gelu", tie_embeddings=False),
    "llama-gqa": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                      head_dim=12, ffn_hidden=40, activation="swiglu", norm="rmsnorm",
                      position="rope", attn_bias=False, mlp_bias=False, tie_embeddings=False,
                      rope_scaling={"type": "linear", "factor": 4.0}),
    "llama-bias-tied": dict(vocab_size=97, block_size=64, n_layer=1, n_head=2, n_embd=32,
                            activation="swiglu", norm="rmsnorm", position="rope", attn_bias=True,
                            mlp_bias=True, tie_embeddings=True, norm_eps=1e-6),
}


@pytest.mark.parametrize("name", sorted(MINILLM_CASES))
def test_saved_model_loads_in_transformers_with_equal_logits(tmp_path, name):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**MINILLM_CASES[name])).eval()
    for p in model.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    save_hf(model, tmp_path, max_shard_bytes=30_000)  # forces a sharded save
    ref = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(load_hf(tmp_path)(x).logits, model(x).logits)


def test_load_to_dtype(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path)
    model = load_hf(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.inv_freq.dtype == torch.float32


# --- bad input ---------------------------------------------------------------------------------------

def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_hf(tmp_path)
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())

    def with_config(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**config, **changes}))

    with_config(model_type="mistral")
    with pytest.raises(ValueError, match="unknown architecture model_type='mistral'"):
        load_hf(tmp_path)
    with_config(hidden_act="gelu")
    with pytest.raises(ValueError, match="config field hidden_act='gelu' is not supported"):
        load_hf(tmp_path)
    with_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        load_hf(tmp_path)
    with_config(intermediate_size=81)
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.mlp.(gate|up|down)_proj.weight': checkpoint"):
        load_hf(tmp_path)
    with_config()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated safetensors file"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_gpt2_unsupported_field(tmp_path):
    ref = hf_model("gpt2", GPT2_CASES["tied"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        load_hf(tmp_path)


def test_loading_holds_the_weights_once(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16384, block_size=256, n_layer=12, n_head=8, n_embd=512,
                            activation="swiglu", norm="rmsnorm", position="rope", attn_bias=False,
                            mlp_bias=False, tie_embeddings=False))
    save_hf(model, tmp_path)
    del model
    size = (tmp_path / "model.safetensors").stat().st_size
    assert size > 190e6
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "workers" / "load_hf_memory.py"),
                          str(tmp_path)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    added, weights = map(int, out.stdout.split())
    assert weights > 0.99 * size
    assert added < 1.5 * size, f"loading {size / 1e6:.0f} MB raised peak RSS by {added / 1e6:.0f} MB"
