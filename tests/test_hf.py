import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from minillm.errors import UserError
from minillm.hf import load_hf, save_hf
from minillm.model import GPT, ModelConfig

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
    with pytest.raises(UserError, match="config.json not found"):
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
    with pytest.raises(UserError, match=r"config field hidden_act='gelu' is not supported by minillm "
                       r"\(supported: 'silu'\)$"):
        load_hf(tmp_path)
    with_config(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        load_hf(tmp_path)
    with_config(intermediate_size=81)
    with pytest.raises(UserError, match=r"tensor 'model.layers.0.mlp.(gate|up|down)_proj.weight' has shape "
                       r"\(\d+, \d+\), config.json implies"):
        load_hf(tmp_path)
    with_config()
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file .* truncated"):
        load_hf(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(UserError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_gpt2_unsupported_field(tmp_path):
    ref = hf_model("gpt2", GPT2_CASES["tied"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx=True is not supported"):
        load_hf(tmp_path)


def test_loading_holds_the_weights_once(tmp_path):
    """Peak resident memory (anonymous + file-backed, every weight touched) added by loading a
    231 MB checkpoint, in one file and in five shards: one copy of the weights, within 25%."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=16384, block_size=256, n_layer=12, n_head=8, n_embd=512,
                            activation="swiglu", norm="rmsnorm", position="rope", attn_bias=False,
                            mlp_bias=False, tie_embeddings=False))
    save_hf(model, tmp_path / "single")
    save_hf(model, tmp_path / "sharded", max_shard_bytes=50_000_000)
    del model
    size = (tmp_path / "single" / "model.safetensors").stat().st_size
    assert size > 190e6 and len(list((tmp_path / "sharded").glob("model-*.safetensors"))) == 5
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for folder in ("single", "sharded"):
        out = subprocess.run([sys.executable, str(Path(__file__).parent / "workers" / "load_hf_memory.py"),
                              str(tmp_path / folder)], capture_output=True, text=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        added, weights = map(int, out.stdout.split())
        assert weights > 0.99 * size
        assert added < 1.25 * size, f"{folder}: loading {size / 1e6:.0f} MB raised peak memory by {added / 1e6:.0f} MB"


# --- tokenizers --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def docs():
    from minillm.corpus import stdlib_docstrings
    return list(stdlib_docstrings(max_files=30))


PROBES = ["héllo wörld  ünïcode 日本語 🎉", "  leading spaces", "a\n\nb\r\n c\t\td", "x", "",
          "numbers 1234567 and 3.14", "it's we'll they're", "<|endoftext|> as text"]


def test_byte_level_tokenizer_json_ids_equal_transformers(tmp_path, docs):
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from minillm.hf import load_hf_tokenizer

    for split in (None, r"\p{N}{1,3}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"):  # GPT-2 style, Llama-3 style
        hf = HFTokenizer(models.BPE())
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
        hf.pre_tokenizer = byte_level if split is None else pre_tokenizers.Sequence([
            pre_tokenizers.Split(pattern=__import__("tokenizers").Regex(split), behavior="isolated"),
            byte_level])
        hf.decoder = decoders.ByteLevel()
        hf.train_from_iterator(docs, trainers.BpeTrainer(
            vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        hf.save(str(tmp_path / "tokenizer.json"))
        ours = load_hf_tokenizer(tmp_path)
        ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
        for text in docs[:150] + PROBES:
            # transformers matches special-token strings in any text: compare with them allowed
            ids = ours.encode(text, allowed_special="all")
            assert ids == ref.encode(text, add_special_tokens=False), text[:60]
            assert ours.decode(ours.encode_ordinary(text)) == text
        assert ours.special_tokens == {"<|endoftext|>": 0}
        assert ours.encode("<|endoftext|>", allowed_special="all") == [0]


def test_sentencepiece_ids_equal_transformers_and_sentencepiece(tmp_path, docs):
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from minillm.hf import load_hf_tokenizer
    from minillm.hf import load_any_tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(  # LLaMA-2's settings: identity normalisation, byte fallback
        sentence_iterator=iter(docs), model_writer=model, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    (tmp_path / "tokenizer.model").write_bytes(model.getvalue())
    ours = load_hf_tokenizer(tmp_path)
    ref = LlamaTokenizer.from_pretrained(tmp_path)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    for text in docs[:150] + PROBES:
        ids = ours.encode_ordinary(text)
        assert ids == sp.encode(text)
        # transformers' converted Llama tokenizer treats leading whitespace differently from
        # SentencePiece itself (its "legacy" handling); minillm follows SentencePiece.
        if not text[:1].isspace():
            assert ids == ref.encode(text, add_special_tokens=False), text[:60]
        assert ours.decode(ids) == sp.decode(ids)
    assert ours.eot_id == 2 and ours.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
    with pytest.raises(ValueError, match="special token '</s>'"):
        ours.encode("end</s>")
    assert ours.encode("end</s>", allowed_special="all")[-1] == 2
    from minillm.data import TokenDataset, prepare
    prepare(docs[:20], ours, tmp_path / "data", val_fraction=0.0, progress=False)
    tokens = TokenDataset(tmp_path / "data").shards[0]
    assert int((tokens == 2).sum()) == 20  # documents end with </s>
    ours.save(tmp_path / "spm.json")  # the same file / checkpoint route as BPE tokenizers
    assert load_any_tokenizer(tmp_path / "spm.json").encode_ordinary(docs[0]) == ours.encode_ordinary(docs[0])


def test_unsupported_tokenizer_json_is_refused(tmp_path):
    from minillm.hf import load_hf_tokenizer

    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="model type 'WordPiece'"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        load_hf_tokenizer(tmp_path)


def test_minillm_tokenizer_exports_to_tokenizer_json_with_equal_ids(tmp_path, docs):
    from transformers import PreTrainedTokenizerFast

    from minillm.hf import load_hf_tokenizer, save_hf_tokenizer
    from minillm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, train_bpe

    for pattern in (GPT2_PATTERN, GPT4_PATTERN):
        tok = train_bpe(docs, vocab_size=700, pattern=pattern)
        save_hf_tokenizer(tok, tmp_path)
        ref = PreTrainedTokenizerFast.from_pretrained(tmp_path)
        for text in docs[:150] + PROBES:
            assert ref.encode(text, add_special_tokens=False) == tok.encode(text, allowed_special="all"), text[:60]
        back = load_hf_tokenizer(tmp_path)
        assert back.mergeable_ranks == tok.mergeable_ranks and back.special_tokens == tok.special_tokens


def test_convert_script_round_trip(tmp_path, docs):
    import importlib.util

    from minillm.checkpoint import load_model, save_model
    from minillm.tokenizer import train_bpe

    spec = importlib.util.spec_from_file_location("convert", Path(__file__).parents[1] / "scripts" / "convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    tok = train_bpe(docs, vocab_size=300)
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**MINILLM_CASES["llama-gqa"], "vocab_size": tok.vocab_size})).eval()
    save_model(tmp_path / "m.pt", model, tok)
    convert.main(["--source", str(tmp_path / "m.pt"), "--dest", str(tmp_path / "hf")])
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    convert.main(["--source", str(tmp_path / "hf"), "--dest", str(tmp_path / "back.pt")])
    back, back_tok, _ = load_model(tmp_path / "back.pt")
    x = torch.randint(0, tok.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back(x).logits, model(x).logits)
    assert back_tok.mergeable_ranks == tok.mergeable_ranks


def test_continued_pretraining_from_a_hf_folder(tmp_path, docs):
    from minillm.data import MixtureLoader, TokenDataset, TokenLoader, prepare
    from minillm.distributed import DistInfo
    from minillm.hf import save_hf_tokenizer
    from minillm.hf import load_any_tokenizer
    from minillm.tokenizer import train_bpe
    from minillm.train import TrainConfig, Trainer

    tok = train_bpe(docs, vocab_size=300)
    ref = hf_model("llama", dict(LLAMA_CASES["mha"]))
    ref.resize_token_embeddings(tok.vocab_size)
    ref.save_pretrained(tmp_path / "hf")
    save_hf_tokenizer(tok, tmp_path / "hf")
    prepare(docs, load_any_tokenizer(tmp_path / "hf"), tmp_path / "data", val_fraction=0.1, progress=False)
    cfg = TrainConfig(data=[str(tmp_path / "data")], out_dir=str(tmp_path / "run"),
                      init_from=str(tmp_path / "hf"), block_size=32, batch_size=4, max_steps=3,
                      warmup_steps=1, eval_interval=0, ckpt_interval=3, progress=False)
    history = Trainer(cfg, DistInfo()).train()
    loader = MixtureLoader({"data": TokenLoader(TokenDataset(tmp_path / "data"), 32, 4, seed=0,
                                                rank=0, world_size=1)}, {"data": 1}, batch_size=4)
    x, y, _ = loader.next_batch()
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(ref(x).logits.view(-1, tok.vocab_size), y.view(-1))
    assert history[0]["loss"] == pytest.approx(expected.item(), abs=1e-5)
