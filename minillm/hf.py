"""Hugging Face checkpoints in and out: `GPT2LMHeadModel` and `LlamaForCausalLM`, exactly.

    model = load_hf("path/to/llama-folder", dtype=torch.bfloat16, device="cuda")
    tok = load_hf_tokenizer("path/to/llama-folder")
    save_hf(model, "path/to/out", tokenizer=tok)  # transformers' from_pretrained loads it, same logits

Loading builds the model on the meta device (no memory, no initialisation), then reads the
checkpoint one tensor at a time, converts it (GPT-2's Conv1D weights are stored transposed and its
q/k/v fused), moves it straight to the target device and dtype, and puts it in place: the weights
are never held twice. A config field that changes the computation and that minillm does not
implement is refused with its name; nothing is silently ignored. LLaMA checkpoints in the Hugging
Face layout already use RoPE's rotate-half pairing, which is minillm's, so no weight is permuted.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import UserError
from .fileio import atomic_write
from .model import GPT, DenseFFN, ModelConfig, rope_inv_freq
from .checkpoint import load_torch_file
from .tokenizer import GPT2_PATTERN, SentencePieceTokenizer, Tokenizer, read_json, tokenizer_from_dict

CONFIG = "config.json"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"

GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                    "relu": "relu"}


# --- configs ------------------------------------------------------------------------------------------

def _require(hf: dict, field: str, supported, source: str, default=None) -> None:
    """Refuse a config field whose value changes the math in a way minillm does not implement."""
    value = hf.get(field, default)
    if value not in supported:
        raise UserError(f"{source}: config field {field}={value!r} is not supported by minillm "
                        f"(supported: {', '.join(sorted(map(repr, supported)))})")


def _rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, minillm rope_scaling) from either config style: `rope_theta` + `rope_scaling`
    (transformers 4) or `rope_parameters` (transformers 5). When both are there, transformers 5
    takes a non-empty `rope_scaling` whole and ignores `rope_parameters`; `rope_theta` inside the
    chosen dict wins over the top-level field, and llama3's original length defaults to
    `max_position_embeddings`."""
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = float(scaling.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    try:
        if kind == "linear":
            return theta, {"type": "linear", "factor": float(scaling["factor"])}
        if kind == "llama3":
            original = scaling.get("original_max_position_embeddings",
                                   hf.get("max_position_embeddings", 2048))
            return theta, {"type": "llama3", "factor": float(scaling["factor"]),
                           "low_freq_factor": float(scaling["low_freq_factor"]),
                           "high_freq_factor": float(scaling["high_freq_factor"]),
                           "original_max_position_embeddings": int(original)}
    except KeyError as e:
        raise UserError(f"{source}: rope scaling of type {kind!r} lacks the field {e.args[0]!r}") from None
    raise UserError(f"{source}: config field rope_scaling type {kind!r} is not supported by "
                    "minillm (supported: default, linear, llama3)")


def config_from_hf(hf: dict, source: str = CONFIG) -> ModelConfig:
    """A minillm config from a Hugging Face `config.json` dict."""
    try:
        return _config_from_hf(hf, source)
    except KeyError as e:
        raise UserError(f"{source}: config field {e.args[0]!r} is missing") from None
    except UserError:
        raise
    except (ValueError, TypeError) as e:  # ModelConfig's own checks, or a field of the wrong type
        raise UserError(f"{source}: {e}") from None


def _config_from_hf(hf: dict, source: str) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        _require(hf, "scale_attn_weights", {True}, source, True)
        _require(hf, "scale_attn_by_inverse_layer_idx", {False}, source, False)
        _require(hf, "add_cross_attention", {False}, source, False)
        _require(hf, "activation_function", set(GPT2_ACTIVATIONS), source, "gelu_new")
        n_embd = hf["n_embd"]
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"],
                           n_layer=hf["n_layer"], n_head=hf["n_head"], n_embd=n_embd,
                           ffn_hidden=hf.get("n_inner") or 4 * n_embd,
                           activation=GPT2_ACTIVATIONS[hf.get("activation_function", "gelu_new")],
                           norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                           position="learned", tie_embeddings=hf.get("tie_word_embeddings", True))
    if model_type == "llama":
        _require(hf, "hidden_act", {"silu"}, source, "silu")
        theta, scaling = _rope(hf, source)
        n_head = hf["num_attention_heads"]
        return ModelConfig(vocab_size=hf["vocab_size"], block_size=hf.get("max_position_embeddings", 2048),
                           n_layer=hf["num_hidden_layers"], n_head=n_head,
                           n_kv_head=hf.get("num_key_value_heads") or n_head,
                           n_embd=hf["hidden_size"],
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
                           ffn_hidden=hf["intermediate_size"], activation="swiglu", norm="rmsnorm",
                           norm_eps=hf.get("rms_norm_eps", 1e-6), position="rope", rope_theta=theta,
                           rope_scaling=scaling, attn_bias=hf.get("attention_bias", False),
                           mlp_bias=hf.get("mlp_bias", False),
                           tie_embeddings=hf.get("tie_word_embeddings", False))
    raise UserError(f"{source}: unknown architecture model_type={model_type!r} "
                    f"(architectures {hf.get('architectures')}); minillm loads gpt2 and llama")


def family(cfg: ModelConfig) -> str:
    """'gpt2' or 'llama' if the config is expressible in that Hugging Face architecture."""
    if (cfg.position == "learned" and cfg.norm == "layernorm" and cfg.activation != "swiglu"
            and cfg.attn_bias and cfg.mlp_bias and cfg.n_kv_head == cfg.n_head
            and cfg.head_dim * cfg.n_head == cfg.n_embd):
        return "gpt2"
    if cfg.position == "rope" and cfg.norm == "rmsnorm" and cfg.activation == "swiglu":
        return "llama"
    raise UserError("this model matches neither GPT2LMHeadModel (learned positions, LayerNorm, "
                    "biases, no SwiGLU) nor LlamaForCausalLM (RoPE, RMSNorm, SwiGLU)")


def config_to_hf(cfg: ModelConfig) -> dict:
    if family(cfg) == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}[cfg.activation]
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_embd": cfg.n_embd,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ffn_hidden,
                "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
                "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                "attn_pdrop": 0.0}
    scaling = None
    if cfg.rope_scaling is not None:
        scaling = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
        scaling.update(type=cfg.rope_scaling["type"], rope_type=cfg.rope_scaling["type"])
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.block_size,
            "hidden_size": cfg.n_embd, "intermediate_size": cfg.ffn_hidden,
            "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "attention_bias": cfg.attn_bias, "mlp_bias": cfg.mlp_bias,
            "tie_word_embeddings": cfg.tie_embeddings,
            # both spellings: transformers 4 reads the first two, transformers 5 the third
            "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": cfg.rope_theta}}


# --- weight names -------------------------------------------------------------------------------------

_GPT2_LAYER = {"ln_1": "norm1", "ln_2": "norm2", "attn.c_proj": "attn.wo", "mlp.c_fc": "ffn.up",
               "mlp.c_proj": "ffn.down"}
_LLAMA_LAYER = {"self_attn.q_proj": "attn.wq", "self_attn.k_proj": "attn.wk",
                "self_attn.v_proj": "attn.wv", "self_attn.o_proj": "attn.wo",
                "mlp.gate_proj": "ffn.gate", "mlp.up_proj": "ffn.up", "mlp.down_proj": "ffn.down",
                "input_layernorm": "norm1", "post_attention_layernorm": "norm2"}
_IGNORED = re.compile(r"(\.attn\.(masked_)?bias$|rotary_emb\.inv_freq$)")  # old buffers, not weights


def _convert_gpt2(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    name = name.removeprefix("transformer.")
    if name in ("wte.weight", "wpe.weight", "lm_head.weight"):
        return [(name, t)]
    if name.startswith("ln_f."):
        return [("norm_f." + name[5:], t)]
    i, module, kind = re.fullmatch(r"h\.(\d+)\.(.+)\.(weight|bias)", name).groups()
    prefix = f"blocks.{i}."
    if module == "attn.c_attn":  # fused q, k, v; Conv1D weights are (in, out)
        t = t.t() if kind == "weight" else t
        return [(prefix + f"attn.{w}.{kind}", part.contiguous())
                for w, part in zip(("wq", "wk", "wv"), t.split(cfg.n_embd, dim=0))]
    conv1d = kind == "weight" and module != "ln_1" and module != "ln_2"
    return [(prefix + f"{_GPT2_LAYER[module]}.{kind}", t.t().contiguous() if conv1d else t)]


def _convert_llama(name: str, t: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    simple = {"model.embed_tokens.weight": "wte.weight", "model.norm.weight": "norm_f.weight",
              "lm_head.weight": "lm_head.weight"}
    if name in simple:
        return [(simple[name], t)]
    i, module, kind = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name).groups()
    return [(f"blocks.{i}.{_LLAMA_LAYER[module]}.{kind}", t)]


def _safetensors_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file, one at a time. `pread` reads each tensor's bytes into
    the memory that becomes the tensor: the load costs one copy of the weights, and the model does
    not depend on the file afterwards (the default memory map would leave CPU weights backed by
    the file's pages, and hold a shard's pages resident while converting dtypes)."""
    try:
        with safe_open(path, framework="pt", backend="pread") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except SafetensorError as e:
        raise UserError(f"{path}: not a valid safetensors file ({e}); a truncated or damaged "
                        "download?") from None


def _bin_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a `pytorch_model.bin` (zip files memory-mapped, pre-zip files read whole)."""
    state = load_torch_file(path, expected="a PyTorch state dict (pytorch_model.bin)", mmap=True)
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise UserError(f"{path}: expected a state dict (names to tensors), found {type(state).__name__}")
    yield from state.items()


def _checkpoint_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint in `folder`, one at a time, shard by shard."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (BIN_INDEX, BIN)):
        index = folder / index_name
        if index.is_file():
            try:
                files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
                raise UserError(f"{index}: not a shard index (expected JSON with a weight_map)") from None
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        for file in files:
            if not (folder / file).is_file():
                raise UserError(f"{folder / file}: listed in {index} but missing")
            read = _safetensors_file if file.endswith(".safetensors") else _bin_file
            yield from read(folder / file)
        return
    raise UserError(f"{folder}: no {SAFETENSORS}, {SAFETENSORS_INDEX}, {BIN} or {BIN_INDEX}")


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    *path, leaf = name.split(".")
    module = model.get_submodule(".".join(path))
    module._parameters[leaf] = nn.Parameter(value, requires_grad=True)


def load_hf(folder: str | Path, device: str | torch.device = "cpu",
            dtype: torch.dtype | None = None) -> GPT:
    """A minillm `GPT` from a Hugging Face model folder; `dtype` None keeps the checkpoint's.

    Errors name the checkpoint's own tensors. A config that ties the embeddings while the
    checkpoint holds a different `lm_head.weight` loads untied, with a warning, as transformers 5
    does; an `lm_head.weight` equal to the embedding (or standing in for a missing one) is tied."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise UserError(f"{folder / CONFIG} not found: not a Hugging Face model folder")
    try:
        hf = json.loads((folder / CONFIG).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, str(folder / CONFIG))
    gpt2 = hf["model_type"] == "gpt2"
    convert = _convert_gpt2 if gpt2 else _convert_llama
    with torch.device("meta"):
        model = GPT(cfg)
    # Every tensor the checkpoint must hold, by its Hugging Face name, with its shape there.
    expected = {name: tuple(t.shape) for name, t in hf_state_dict(model)}
    embedding = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    loaded, head = set(), None
    for hf_name, tensor in _checkpoint_tensors(folder):
        if _IGNORED.search(hf_name):
            continue
        # old GPT-2 files name their tensors without the "transformer." prefix
        name = "transformer." + hf_name if gpt2 and hf_name.startswith(("h.", "wte.", "wpe.", "ln_f.")) \
            else hf_name
        tied_head = name == "lm_head.weight" and cfg.tie_embeddings
        expected_shape = expected[embedding] if tied_head else expected.get(name)
        if expected_shape is None:
            raise UserError(f"{folder}: unexpected tensor {hf_name!r} for a {hf['model_type']} model "
                            f"with {cfg.n_layer} layers (config.json)")
        if tuple(tensor.shape) != expected_shape:
            raise UserError(f"{folder}: tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                            f"config.json implies {expected_shape}")
        if tied_head:
            head = tensor.to(device=device, dtype=dtype or tensor.dtype)  # decided below
            continue
        for ours, t in convert(name, tensor, cfg):
            _set_tensor(model, ours, t.to(device=device, dtype=dtype or t.dtype))
        loaded.add(name)
    if head is not None:
        if embedding not in loaded:  # the head stands in for the embedding, as in transformers
            _set_tensor(model, "wte.weight", head)
            loaded.add(embedding)
        elif not torch.equal(head, model.wte.weight):
            warnings.warn(f"{folder}: config.json ties the embeddings, but lm_head.weight differs "
                          f"from {embedding}; both are loaded, untied (as transformers does)")
            cfg.tie_embeddings = False
            _set_tensor(model, "lm_head.weight", head)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.wte.weight
    missing = [name for name in expected if name not in loaded]
    if missing:
        raise UserError(f"{folder}: the checkpoint lacks {len(missing)} tensor(s): "
                        f"{', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
    if cfg.position == "rope":
        model.inv_freq = rope_inv_freq(cfg).to(device)
    return model.eval()


# --- saving ------------------------------------------------------------------------------------------

def hf_state_dict(model: GPT) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor) pairs of `model`, converted back to that layout."""
    cfg = model.config
    gpt2 = family(cfg) == "gpt2"
    sd = model.state_dict()
    if gpt2:
        yield "transformer.wte.weight", sd["wte.weight"]
        yield "transformer.wpe.weight", sd["wpe.weight"]
    else:
        yield "model.embed_tokens.weight", sd["wte.weight"]
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        if gpt2:
            h = f"transformer.h.{i}."
            yield h + "attn.c_attn.weight", torch.cat([sd[p + f"attn.{w}.weight"]
                                                       for w in ("wq", "wk", "wv")]).t().contiguous()
            yield h + "attn.c_attn.bias", torch.cat([sd[p + f"attn.{w}.bias"] for w in ("wq", "wk", "wv")])
            for hf_mod, ours in _GPT2_LAYER.items():
                conv1d = not hf_mod.startswith("ln_")
                w = sd[p + ours + ".weight"]
                yield h + hf_mod + ".weight", w.t().contiguous() if conv1d else w
                yield h + hf_mod + ".bias", sd[p + ours + ".bias"]
        else:
            h = f"model.layers.{i}."
            for hf_mod, ours in _LLAMA_LAYER.items():
                yield h + hf_mod + ".weight", sd[p + ours + ".weight"]
                if p + ours + ".bias" in sd and not ours.startswith("norm"):
                    yield h + hf_mod + ".bias", sd[p + ours + ".bias"]
    yield ("transformer.ln_f." if gpt2 else "model.norm.") + "weight", sd["norm_f.weight"]
    if gpt2:
        yield "transformer.ln_f.bias", sd["norm_f.bias"]
    if not cfg.tie_embeddings:
        yield "lm_head.weight", sd["lm_head.weight"]


def special_token_ids(tok) -> dict[str, int | None]:
    """`bos_token_id` / `eos_token_id` for config.json: a SentencePiece model's own; for a BPE
    tokenizer its end-of-text token for both, GPT-2's convention (it separates documents)."""
    if tok is None:
        return {"bos_token_id": None, "eos_token_id": None}
    try:
        eos = tok.eot_id
    except KeyError:
        eos = None
    if isinstance(tok, SentencePieceTokenizer):
        bos = tok.sp.bos_id()
        return {"bos_token_id": bos if bos >= 0 else None, "eos_token_id": eos}
    return {"bos_token_id": eos, "eos_token_id": eos}


def _write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    def write(tmp: Path) -> None:
        save_file(tensors, tmp, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # the library writes mode 0600; give it an ordinary file's mode
    atomic_write(path, write)


def save_hf(model: GPT, folder: str | Path, dtype: torch.dtype | None = None,
            max_shard_bytes: int = 5 * 2**30, tokenizer=None) -> None:
    """Write `model` as a Hugging Face folder: config.json and model.safetensors (sharded with an
    index when larger than `max_shard_bytes`), and `tokenizer` with its files when given.
    config.json's `bos_token_id` / `eos_token_id` are the tokenizer's (null without one: a
    transformers default such as GPT-2's 50256 may lie outside the vocabulary)."""
    moe = [i for i, block in enumerate(model.blocks) if not isinstance(block.ffn, DenseFFN)]
    if moe:
        raise UserError(f"layers {moe} have Mixture-of-Experts (or other non-dense) FFNs, which "
                        "the GPT-2 / LLaMA Hugging Face layouts cannot hold; keep minillm's format "
                        "(MoEfied layers merge back to dense with minillm.moefy.merge_moe)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hf = config_to_hf(model.config)
    hf.update(special_token_ids(tokenizer))
    first = next(iter(model.parameters()))
    hf["torch_dtype"] = hf["dtype"] = str(dtype or first.dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in hf_state_dict(model):
        t = t.detach().to("cpu", dtype or t.dtype)
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    for stale in folder.glob("model*.safetensors*"):
        stale.unlink()
    if len(shards) == 1:
        _write_safetensors(shards[0], folder / SAFETENSORS)
    else:
        weight_map, total = {}, 0
        for k, shard in enumerate(shards, 1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            _write_safetensors(shard, folder / file)
            weight_map.update({name: file for name in shard})
            total += sum(t.numel() * t.element_size() for t in shard.values())
        (folder / SAFETENSORS_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (folder / CONFIG).write_text(json.dumps(hf, indent=2))
    if tokenizer is not None:
        save_hf_tokenizer(tokenizer, folder)


# --- tokenizers --------------------------------------------------------------------------------------

def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves, the other 68
    bytes for the characters 256, 257, ... in byte order (so every byte is a visible character)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def tokenizer_from_hf_json(path: str | Path):
    """A byte-level BPE `tokenizer.json` (GPT-2, Llama 3 and the like) as a tiktoken-backed
    `Tokenizer` with the same ids. Refuses what would make ids differ: a normalizer, a prefix space,
    a pre-tokenizer other than ByteLevel (optionally after one regex Split), merged tokens whose ids
    are not in merge order (tiktoken merges by rank), or missing single-byte tokens."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"tokenizer file not found: {path}")
    d = _read_tokenizer_json(path)
    if _sentencepiece_style(d):
        raise UserError(f"{path}: a SentencePiece tokenizer in tokenizer.json form (Metaspace, "
                        "'\u2581' for spaces); minillm reads such a tokenizer from its tokenizer.model, "
                        "which is not beside this file")
    model = d.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: model type {model.get('type')!r}; only byte-level BPE converts")
    if d.get("normalizer") is not None:
        raise UserError(f"{path}: field normalizer={d['normalizer'].get('type')!r} is not supported")
    pre = d.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    pattern, has_split = GPT2_PATTERN, False
    if len(steps) == 2 and steps[0].get("type") == "Split":
        has_split = True
        pattern = steps[0]["pattern"].get("Regex")
        if pattern is None or steps[0].get("behavior") != "Isolated" or steps[0].get("invert"):
            raise UserError(f"{path}: pre_tokenizer Split must be an isolated regex split")
        if steps[1].get("use_regex", True):
            raise UserError(f"{path}: ByteLevel after Split must have use_regex=false")
        steps = steps[1:]
    if len(steps) != 1 or steps[0].get("type") != "ByteLevel":
        raise UserError(f"{path}: pre_tokenizer {pre.get('type')!r} is not supported "
                         "(expected ByteLevel, or Split then ByteLevel)")
    if steps[0].get("add_prefix_space"):
        raise UserError(f"{path}: pre_tokenizer ByteLevel add_prefix_space=true is not supported")
    if not has_split and not steps[0].get("use_regex", True):
        raise UserError(f"{path}: pre_tokenizer ByteLevel use_regex=false without a Split is not "
                         "supported (it does not split words)")

    char_to_byte = {c: b for b, c in byte_level_alphabet().items()}
    specials = {t["content"]: t["id"] for t in d.get("added_tokens", []) if t.get("special")}
    plain_added = [t["content"] for t in d.get("added_tokens", [])
                   if not t.get("special") and t["content"] not in model["vocab"]]
    if plain_added:
        raise UserError(f"{path}: non-special added tokens {plain_added[:3]} are not supported")
    ranks: dict[bytes, int] = {}
    for token, i in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(char_to_byte[c] for c in token)] = i
        except KeyError:
            raise UserError(f"{path}: token {token!r} is not byte-level encoded") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{path}: {len(missing)} single-byte tokens are missing (e.g. byte {missing[0]})")
    last = -1
    for merge in model.get("merges", []):
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = model["vocab"].get(a + b)
        if rank is None or rank <= last:
            raise UserError(f"{path}: merge {a!r} + {b!r} does not produce a token with a larger id "
                             "than the previous merge; tiktoken needs ids in merge order")
        last = rank
    return Tokenizer(ranks, pattern, specials, name=path.parent.name or "hf",
                     eot_token=_end_of_text(path.parent, specials))


END_OF_TEXT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "<|eot_id|>", "</s>")


def _end_of_text(folder: Path, specials: dict[str, int]) -> str:
    """The document separator: tokenizer_config.json's eos_token, else a well-known name."""
    config = folder / "tokenizer_config.json"
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos in specials:
            return eos
    return next((name for name in END_OF_TEXT_NAMES if name in specials), "<|endoftext|>")


def _read_tokenizer_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: not a tokenizer.json (expected a JSON object)")
    return d


def _sentencepiece_style(d: dict) -> bool:
    """True for a SentencePiece tokenizer converted by transformers (LLaMA-2's tokenizer.json):
    spaces become '\u2581' in its pre-tokenizer (Metaspace) or its normalizer."""
    steps = json.dumps([d.get("pre_tokenizer"), d.get("normalizer")], ensure_ascii=False)
    return "Metaspace" in steps or "\u2581" in steps


def load_any_tokenizer(path: str | Path):
    """Any tokenizer minillm reads: a file minillm wrote (`Tokenizer.save`, also for a converted
    SentencePiece model), or a Hugging Face model folder, `tokenizer.json` or SentencePiece
    `tokenizer.model`. It lives here, not in tokenizer.py, because it reads Hugging Face's formats
    too; tokenizer.py knows only minillm's own."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".model":
        return load_hf_tokenizer(path)
    d = read_json(path)
    if isinstance(d, dict) and "format" not in d and "model" in d:  # a Hugging Face tokenizer.json
        return tokenizer_from_hf_json(path)
    return tokenizer_from_dict(d, source=str(path))


def load_hf_tokenizer(path: str | Path):
    """The tokenizer of a Hugging Face folder, or of its `tokenizer.json` / `tokenizer.model`.

    A folder's byte-level `tokenizer.json` is read as such. A folder that also holds a SentencePiece
    `tokenizer.model` (LLaMA-2: its tokenizer.json is a Metaspace conversion) is read from that
    model, so the ids are SentencePiece's own."""
    path = Path(path)
    if path.is_dir():
        json_file, spm_file = path / "tokenizer.json", path / "tokenizer.model"
        if spm_file.is_file() and (not json_file.is_file()
                                   or _sentencepiece_style(_read_tokenizer_json(json_file))):
            return _sentencepiece_file(spm_file)
        if json_file.is_file():
            return tokenizer_from_hf_json(json_file)
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model")
    if path.suffix == ".model":
        return _sentencepiece_file(path)
    return tokenizer_from_hf_json(path)


def _sentencepiece_file(path: Path) -> SentencePieceTokenizer:
    if not path.is_file():
        raise UserError(f"SentencePiece model not found: {path}")
    try:
        return SentencePieceTokenizer.from_file(path)
    except RuntimeError as e:  # sentencepiece's parse error
        raise UserError(f"{path}: not a SentencePiece model ({e})") from None


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The pair whose merge created `token`: BPE on its bytes with only lower-ranked tokens must
    end in exactly two parts (tiktoken keeps no merge list, but the ranks imply it)."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best = min(range(len(parts) - 1),
                   key=lambda i: ranks.get(parts[i] + parts[i + 1], limit))
        if ranks.get(parts[best] + parts[best + 1], limit) >= limit:
            return None
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def tokenizer_to_hf_json(tok) -> dict:
    """A `tokenizer.json` (Hugging Face `tokenizers`) equivalent to a minillm BPE `Tokenizer`.
    `ignore_merges` makes a word that is itself a token map to it directly, as tiktoken does."""
    to_char = byte_level_alphabet()

    def text(b: bytes) -> str:
        return "".join(to_char[x] for x in b)

    merges = []
    for token, _ in sorted(tok.mergeable_ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            pair = _merge_of(token, tok.mergeable_ranks)
            if pair is None:
                raise UserError(f"token {token!r} cannot be built by merges; no tokenizer.json form")
            merges.append([text(pair[0]), text(pair[1])])
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for s, i in sorted(tok.special_tokens.items(),
                                                                     key=lambda kv: kv[1])]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tok.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": True,
                  "vocab": {text(t): i for t, i in tok.mergeable_ranks.items()},
                  "merges": merges},
    }


def save_hf_tokenizer(tok, folder: str | Path) -> None:
    """Write `tok` into a Hugging Face folder: tokenizer.json for BPE, tokenizer.model for
    SentencePiece, plus a tokenizer_config.json naming its end-of-text token."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_max_length": 1_000_000}
    if isinstance(tok, SentencePieceTokenizer):
        (folder / "tokenizer.model").write_bytes(tok.model_proto)
        config["tokenizer_class"] = "LlamaTokenizer"
    else:
        (folder / "tokenizer.json").write_text(json.dumps(tokenizer_to_hf_json(tok)))
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    try:
        eot = tok.sp.id_to_piece(tok.eot_id) if isinstance(tok, SentencePieceTokenizer) else \
            next(s for s, i in tok.special_tokens.items() if i == tok.eot_id)
        config["eos_token"] = eot
    except (KeyError, StopIteration):
        pass
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
