"""Hugging Face folders as other tools write them: LLaMA-2's tokenizer pair, tied configs with a
distinct head, hand-edited safetensors headers, pre-zip .bin files, both RoPE config spellings,
and the special-token ids written for the tokenizer that goes with a model."""

import io
import json
import struct

import pytest
import torch

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from safetensors.torch import save_file
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaTokenizer,
                          PreTrainedTokenizerFast)

from minillm.errors import UserError
from minillm.hf import config_from_hf, load_hf, load_hf_tokenizer, save_hf
from minillm.model import GPT, ModelConfig
from tests.test_hf import GPT2_CASES, LLAMA_CASES, MINILLM_CASES, PROBES, hf_model

MORE_PROBES = ["The year 2024 had 366 days.", "tabs\tand\nnewlines\n\n\nend  ", "ẞtraße — “quotes” …",
               "def f(x):\n    return x ** 2  # square", "emoji 🦙🦙 and 한국어", "trailing space ",
               "UPPER lower MiXeD 12ab34"]


@pytest.fixture(scope="module")
def docs():
    from minillm.corpus import stdlib_docstrings
    return list(stdlib_docstrings(max_files=30))


def spm_proto(docs, **overrides) -> bytes:
    """A SentencePiece model trained with LLaMA-2's settings (identity normalisation, byte fallback)."""
    model = io.BytesIO()
    settings = dict(vocab_size=400, model_type="bpe", byte_fallback=True, character_coverage=1.0,
                    normalization_rule_name="identity", remove_extra_whitespaces=False,
                    add_dummy_prefix=True, split_digits=True, allow_whitespace_only_pieces=True,
                    unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    spm.SentencePieceTrainer.train(sentence_iterator=iter(docs), model_writer=model,
                                   **{**settings, **overrides})
    return model.getvalue()


def save_state(folder, state: dict, config) -> None:
    """A checkpoint folder holding exactly `state`, as another tool might have written it."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in state.items()},
              folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(config.to_json_string())


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


# --- tokenizers ------------------------------------------------------------------------------------

def test_llama2_folder_reads_the_sentencepiece_model_beside_a_metaspace_tokenizer_json(tmp_path, docs):
    proto = spm_proto(docs)
    (tmp_path / "spm").mkdir()
    (tmp_path / "spm" / "tokenizer.model").write_bytes(proto)
    folder = tmp_path / "llama2"
    # transformers converts the SentencePiece model and writes its tokenizer.json form
    LlamaTokenizer.from_pretrained(tmp_path / "spm").save_pretrained(folder)
    tokenizer_json = json.loads((folder / "tokenizer.json").read_text())
    assert tokenizer_json["pre_tokenizer"]["type"] == "Metaspace"
    assert len(tokenizer_json["model"]["vocab"]) == 400
    (folder / "tokenizer.model").write_bytes(proto)  # the Llama-2 layout: both files

    ours = load_hf_tokenizer(folder)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in docs[:150] + PROBES + MORE_PROBES:
        ids = ours.encode_ordinary(text)
        assert ids == sp.encode(text), text[:60]
        if not text[:1].isspace():  # where transformers' conversion differs (README)
            assert ids == fast.encode(text, add_special_tokens=False), text[:60]
    assert ours.eot_id == 2

    (folder / "tokenizer.model").unlink()
    with pytest.raises(UserError, match=r"tokenizer.json: a SentencePiece tokenizer in tokenizer.json "
                                        r"form \(Metaspace.*from its tokenizer.model"):
        load_hf_tokenizer(folder)


# --- weights ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_tied_config_with_a_distinct_lm_head_loads_untied_as_in_transformers(tmp_path, kind):
    kw = LLAMA_CASES["mha"] if kind == "llama" else GPT2_CASES["untied-odd-inner-relu"]
    ref = hf_model(kind, {**kw, "tie_word_embeddings": False})
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    embedding = "model.embed_tokens.weight" if kind == "llama" else "transformer.wte.weight"
    with pytest.warns(UserWarning, match=f"lm_head.weight differs from {embedding}; both are loaded, untied"):
        ours = load_hf(tmp_path)
    assert not ours.config.tie_embeddings and ours.lm_head.weight is not ours.wte.weight
    x = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(logits(theirs, x), logits(ref, x))  # transformers used the head
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-4, rtol=1e-4)


def test_tied_config_ties_an_equal_head_and_a_head_without_embedding(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["gqa-tied-bias"])
    state = ref.state_dict()
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    save_state(tmp_path / "both", state, ref.config)  # both stored, equal (as .bin files do)
    del state["model.embed_tokens.weight"]
    save_state(tmp_path / "head-only", state, ref.config)
    x = torch.randint(0, 101, (2, 24))
    for case in ("both", "head-only"):
        ours = load_hf(tmp_path / case)
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / case).eval()
        assert ours.config.tie_embeddings and ours.lm_head.weight is ours.wte.weight
        torch.testing.assert_close(logits(ours, x), logits(theirs, x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logits(ours, x), logits(ref, x), atol=1e-4, rtol=1e-4)


def test_safetensors_with_overlapping_offsets_is_refused(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    # q_proj and o_proj have the same size: point o_proj at q_proj's bytes (sizes still agree)
    q, o = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"
    header[o]["data_offsets"] = header[q]["data_offsets"]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(UserError, match=r"model.safetensors: not a valid safetensors file \(.*offset"):
        load_hf(tmp_path)


def test_pre_zip_pytorch_model_bin_loads(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["gqa-tied-bias"])
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    (tmp_path / "config.json").write_text(ref.config.to_json_string())
    x = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(logits(load_hf(tmp_path), x), logits(ref, x), atol=1e-4, rtol=1e-4)
    (tmp_path / "pytorch_model.bin").write_text("not a checkpoint\n")
    with pytest.raises(UserError, match="pytorch_model.bin: not a PyTorch file"):
        load_hf(tmp_path)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
ROPE_CONFIGS = {  # config.json fields beside both spellings, as edited or merged by hand
    "scaling-wins": dict(rope_theta=20000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                         rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
    "theta-inside-scaling": dict(rope_theta=20000.0,
                                 rope_scaling={"type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "null-scaling": dict(rope_theta=20000.0, rope_scaling=None,
                         rope_parameters={**LLAMA3, "rope_theta": 500000.0}),
    "empty-scaling-top-theta": dict(rope_theta=3000.0, rope_scaling={},
                                    rope_parameters={"rope_type": "linear", "factor": 3.0}),
    "llama3-default-original": dict(rope_parameters={k: v for k, v in LLAMA3.items()
                                                     if k != "original_max_position_embeddings"}),
}


@pytest.mark.parametrize("name", sorted(ROPE_CONFIGS))
def test_rope_scaling_and_rope_parameters_follow_transformers(tmp_path, name):
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_theta", "rope_scaling", "rope_parameters"):
        config.pop(key, None)
    config.update(ROPE_CONFIGS[name], max_position_embeddings=64)
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    params = theirs.config.rope_parameters
    ours_cfg = config_from_hf(config)
    assert ours_cfg.rope_theta == params["rope_theta"]
    if params["rope_type"] == "default":
        assert ours_cfg.rope_scaling is None
    else:
        assert ours_cfg.rope_scaling == {"type": params["rope_type"],
                                         **{k: params[k] for k in ours_cfg.rope_scaling if k != "type"}}
    x = torch.randint(0, 101, (2, 60))
    torch.testing.assert_close(logits(load_hf(tmp_path), x), logits(theirs, x), atol=1e-4, rtol=1e-4)


def test_errors_name_the_checkpoints_own_tensors(tmp_path):
    llama = hf_model("llama", LLAMA_CASES["mha"])
    state = llama.state_dict()
    del state["model.layers.1.mlp.up_proj.weight"]
    save_state(tmp_path / "llama", state, llama.config)
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\): model.layers.1.mlp.up_proj.weight$"):
        load_hf(tmp_path / "llama")
    state = llama.state_dict()
    state["model.layers.2.mlp.up_proj.weight"] = state["model.layers.1.mlp.up_proj.weight"]
    save_state(tmp_path / "llama", state, llama.config)
    with pytest.raises(UserError, match=r"unexpected tensor 'model.layers.2.mlp.up_proj.weight' for a "
                                        r"llama model with 2 layers"):
        load_hf(tmp_path / "llama")

    gpt2 = hf_model("gpt2", GPT2_CASES["tied"])
    state = {k: v for k, v in gpt2.state_dict().items() if not k.endswith(".attn.c_attn.weight")}
    save_state(tmp_path / "gpt2", state, gpt2.config)
    with pytest.raises(UserError, match=r"lacks 2 tensor\(s\): transformer.h.0.attn.c_attn.weight, "
                                        r"transformer.h.1.attn.c_attn.weight$"):
        load_hf(tmp_path / "gpt2")
    state = {k: v for k, v in gpt2.state_dict().items()}
    state["transformer.h.0.attn.c_attn.weight"] = state["transformer.h.0.attn.c_attn.weight"][:, :-3]
    save_state(tmp_path / "gpt2", state, gpt2.config)
    with pytest.raises(UserError, match=r"tensor 'transformer.h.0.attn.c_attn.weight' has shape "
                                        r"\(48, 141\), config.json implies \(48, 144\)"):
        load_hf(tmp_path / "gpt2")


# --- special-token ids -----------------------------------------------------------------------------

def test_save_hf_writes_the_tokenizers_bos_and_eos(tmp_path, docs):
    from minillm.hf import load_hf_tokenizer
    from minillm.tokenizer import SentencePieceTokenizer, train_bpe

    bpe = train_bpe(docs, vocab_size=300)
    sp = SentencePieceTokenizer(spm_proto(docs, unk_id=0, bos_id=2, eos_id=3))  # not LLaMA's 1 / 2
    cases = [("gpt2", bpe, bpe.eot_id, bpe.eot_id), ("llama-gqa", bpe, bpe.eot_id, bpe.eot_id),
             ("llama-bias-tied", sp, 2, 3)]
    for name, tok, bos, eos in cases:
        torch.manual_seed(0)
        model = GPT(ModelConfig(**{**MINILLM_CASES[name], "vocab_size": tok.vocab_size}))
        folder = tmp_path / name
        save_hf(model, folder, tokenizer=tok)
        theirs = AutoModelForCausalLM.from_pretrained(folder)
        assert (theirs.config.bos_token_id, theirs.config.eos_token_id) == (bos, eos), name
        assert (theirs.generation_config.bos_token_id, theirs.generation_config.eos_token_id) == (bos, eos)
        assert load_hf_tokenizer(folder).eot_id == eos
    save_hf(model, tmp_path / "no-tokenizer")  # ids unknown: null, never a default of transformers
    config = AutoConfig.from_pretrained(tmp_path / "no-tokenizer")
    assert (config.bos_token_id, config.eos_token_id) == (None, None)


def test_saved_shards_have_an_ordinary_files_mode(tmp_path):
    import stat

    model = GPT(ModelConfig(**MINILLM_CASES["llama-gqa"]))
    save_hf(model, tmp_path, max_shard_bytes=30_000)
    mode = stat.S_IMODE((tmp_path / "config.json").stat().st_mode)  # as the umask allows
    shards = list(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and all(stat.S_IMODE(p.stat().st_mode) == mode for p in shards)


def test_incomplete_config_is_named(tmp_path):
    ref = hf_model("llama", LLAMA_CASES["mha"])
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"config.json: config field 'hidden_size' is missing$"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"config.json: not valid JSON"):
        load_hf(tmp_path)


def test_gpt2_tensor_names_without_the_transformer_prefix(tmp_path):
    ref = hf_model("gpt2", GPT2_CASES["untied-odd-inner-relu"])
    state = {k.removeprefix("transformer."): v for k, v in ref.state_dict().items()}  # old hub files
    save_state(tmp_path, state, ref.config)
    x = torch.randint(0, 101, (2, 24))
    torch.testing.assert_close(logits(load_hf(tmp_path), x), logits(ref, x), atol=1e-4, rtol=1e-4)
