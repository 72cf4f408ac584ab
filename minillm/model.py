"""One decoder-only Transformer for the GPT-2 and LLaMA families, configured by a dataclass.

GPT-2 (Radford et al. 2019): learned positions, LayerNorm with bias, GELU (tanh form), biases
everywhere, tied input / output embeddings. LLaMA (Touvron et al. 2023): rotary positions (RoPE,
rotate-half layout as in Hugging Face checkpoints, with linear or llama3 frequency scaling), RMSNorm,
SwiGLU, grouped-query attention, no biases, untied embeddings. A ReLU FFN is available for MoEfication
and the modularity analysis.

Extension points, so that methods never patch internals:
- `block.ffn` is any module mapping (B, T, d) -> (B, T, d), or -> ((B, T, d), {name: aux loss});
  auxiliary losses (MoE load balancing, z-loss) are summed over layers into `ModelOutput.aux_losses`.
- `block.ffn.activation_point` (in `DenseFFN`) is an identity module on the activations that feed the
  down projection: a forward hook on it observes them and may return a replacement.
- `Masks` (layer, head, FFN unit, hidden dimension) multiply the corresponding outputs. A hidden-dim
  mask also makes every norm compute its statistics over the kept dimensions only, so that a masked
  model equals the model with those dimensions physically removed (Sheared-LLaMA).
- `inputs_embeds` replaces the token embedding lookup (knowledge plugin); targets of -100 are ignored.
- `model.mask_source`, when set, is a module called at the start of every forward pass that gets no
  `masks`: it returns `(Masks, {name: loss})`, and its losses join `aux_losses`. Learned masks
  (Sheared-LLaMA's hard-concrete masks) live there, so that the trainer's plain `model(x, y)`,
  FSDP (they are parameters of the root module) and checkpoints (they are in the state dict) all
  work without the trainer knowing about masks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .errors import UserError
from .moe import Experts, MoE, active_matmul_params, moe_from_spec, moe_spec

IGNORE_INDEX = -100


# --- configuration --------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    vocab_size: int = 4096
    block_size: int = 256  # longest sequence (size of the learned position table)
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None: n_head (multi-head attention)
    n_embd: int = 128
    head_dim: int | None = None  # None: n_embd // n_head
    ffn_hidden: int | None = None  # None: 4 * n_embd (2/3 of that, rounded to 256, for swiglu)
    activation: str = "gelu_tanh"  # gelu_tanh | gelu | relu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "linear", "factor"} or {"type": "llama3", ...}
    attn_bias: bool = True
    mlp_bias: bool = True
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    # {"<layer>": MoE layer spec (minillm.moe.moe_spec)}: layers whose FFN is a Mixture-of-Experts.
    # Filled by `GPT.describe()` when a checkpoint is written, so that loading rebuilds the tree.
    moe_layers: dict | None = None

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}; "
                                 "set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        if self.ffn_hidden is None:
            hidden = 4 * self.n_embd
            self.ffn_hidden = (hidden if self.activation != "swiglu"
                               else 256 * math.ceil(2 * hidden / 3 / 256))
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} must be a multiple of n_kv_head {self.n_kv_head}")
        for name, value, allowed in (("activation", self.activation, ACTIVATIONS),
                                     ("norm", self.norm, ("layernorm", "rmsnorm")),
                                     ("position", self.position, ("learned", "rope"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")
        for layer in self.moe_layers or {}:
            if not (str(layer).isdigit() and int(layer) < self.n_layer):
                raise ValueError(f"moe_layers names layer {layer!r}; the model has {self.n_layer}")
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ("linear", "llama3"):
            raise ValueError(f"rope_scaling type must be linear or llama3, got {self.rope_scaling}")

    def to_dict(self) -> dict:
        return asdict(self)


def _gpt2(n_layer, n_head, n_embd):
    return dict(vocab_size=50257, block_size=1024, n_layer=n_layer, n_head=n_head, n_embd=n_embd)


def _llama(n_layer, n_head, n_embd, ffn_hidden, n_kv_head=None, block_size=4096):
    return dict(vocab_size=32000, block_size=block_size, n_layer=n_layer, n_head=n_head,
                n_kv_head=n_kv_head, n_embd=n_embd, ffn_hidden=ffn_hidden, activation="swiglu",
                norm="rmsnorm", position="rope", attn_bias=False, mlp_bias=False,
                tie_embeddings=False)


PRESETS = {
    "gpt2": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "llama2-7b": _llama(32, 32, 4096, 11008),
    "sheared-llama-2.7b": _llama(32, 20, 2560, 6912),  # Sheared-LLaMA's pruning targets
    "sheared-llama-1.3b": _llama(24, 16, 2048, 5504),
    # Laptop sizes. tiny-llama uses grouped-query attention so that it exercises that path.
    "tiny-gpt": dict(vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "tiny-llama": dict(_llama(4, 4, 128, 352, n_kv_head=2, block_size=256), vocab_size=4096),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named configuration, with any field overridden."""
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(sorted(PRESETS))}")
    return ModelConfig(**{**PRESETS[name], **overrides})


@dataclass
class ModelSize:
    """The size flags of a method script, in one place: a script's config inherits them
    (`class Config(ModelSize)`, redeclaring a field only to change its default) and passes
    `sizes()` to `preset`. The defaults are the laptop size the method scripts share."""
    n_layer: int = field(default=2, metadata={"help": "transformer blocks"})
    n_embd: int = field(default=64, metadata={"help": "model width"})
    n_head: int = field(default=4, metadata={"help": "attention heads (n_embd must split over them)"})
    block_size: int = field(default=64, metadata={"help": "context length in tokens"})

    def sizes(self) -> dict:
        """{n_layer, n_embd, n_head, block_size}: keyword arguments of `preset` / `ModelConfig`."""
        return {name: getattr(self, name) for name in ("n_layer", "n_embd", "n_head", "block_size")}


@dataclass
class Masks:
    """Multiplicative masks (0/1, or continuous such as Sheared-LLaMA's hard-concrete samples).

    layer (L,): scales layer l's attention and FFN outputs; head (L, n_head): each head's output
    before the output projection; ffn (L, ffn_hidden): activated FFN units; hidden (n_embd,): the
    embeddings, every sub-layer output and every norm output, and norms use only dims where it is
    non-zero for their statistics."""
    layer: torch.Tensor | None = None
    head: torch.Tensor | None = None
    ffn: torch.Tensor | None = None
    hidden: torch.Tensor | None = None


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # mean cross-entropy over targets that are not -100
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


# --- building blocks -------------------------------------------------------------------------------

class Norm(nn.Module):
    """LayerNorm or RMSNorm that, given a hidden mask, normalises over the kept dimensions only."""

    def __init__(self, dim: int, kind: str, eps: float, bias: bool):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if kind == "layernorm" and bias else None

    def forward(self, x: torch.Tensor, hidden_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_mask is None:
            if self.kind == "layernorm":
                return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
            return F.rms_norm(x.float(), x.shape[-1:], None, self.eps).type_as(x) * self.weight
        keep = (hidden_mask != 0).float()
        n_kept = keep.sum()  # in fp32: a bf16 count of more than 256 dimensions would be rounded
        xf = x.float()
        if self.kind == "layernorm":
            mean = (xf * keep).sum(-1, keepdim=True) / n_kept
            xf = (xf - mean) * keep
        var = (xf * xf * keep).sum(-1, keepdim=True) / n_kept
        y = (xf * torch.rsqrt(var + self.eps)).type_as(x) * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y * hidden_mask


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Rotary frequencies (head_dim / 2,), with linear or llama3 scaling applied."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq.float()
    factor = scaling["factor"]
    if scaling["type"] == "linear":  # positions divided by factor
        return (inv_freq / factor).float()
    # llama3: long wavelengths slowed by `factor`, short ones untouched, a smooth blend between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return blended.float()


def apply_rope(x_BHTD: torch.Tensor, cos_BTD: torch.Tensor, sin_BTD: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of each head by position-dependent angles (rotate-half layout)."""
    x1, x2 = x_BHTD.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x_BHTD * cos_BTD[:, None] + rotated * sin_BTD[:, None]


class KVCache:
    """Keys and values of every layer for up to `max_len` positions, filled left to right.

    `length` is the number of positions already cached; a forward pass with T new tokens writes
    positions [length, length + T) of every layer and `advance(T)` moves on."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor):
        """Store new keys / values for `layer`; return all keys / values cached so far."""
        end = self.length + k_BHTD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked for {end}")
        self.k[layer][:, :, self.length:end] = k_BHTD
        self.v[layer][:, :, self.length:end] = v_BHTD
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, h, hkv, hd = cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.wq = nn.Linear(d, h * hd, bias=cfg.attn_bias)
        self.wk = nn.Linear(d, hkv * hd, bias=cfg.attn_bias)
        self.wv = nn.Linear(d, hkv * hd, bias=cfg.attn_bias)
        self.wo = nn.Linear(h * hd, d, bias=cfg.attn_bias)
        self.wo.residual_projection = True  # scaled init, see GPT._init_weights

    def forward(self, x_BTd, rope, attn_mask, kv_cache, layer, head_mask):
        B, T, _ = x_BTd.shape
        cfg = self.cfg
        q_BHTD = self.wq(x_BTd).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)
        k_BHTD = self.wk(x_BTd).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        v_BHTD = self.wv(x_BTd).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        if rope is not None:
            q_BHTD, k_BHTD = apply_rope(q_BHTD, *rope), apply_rope(k_BHTD, *rope)
        if kv_cache is not None:
            k_BHTD, v_BHTD = kv_cache.update(layer, k_BHTD, v_BHTD)
        if cfg.n_kv_head != cfg.n_head:  # each key/value head serves n_head / n_kv_head queries
            repeat = cfg.n_head // cfg.n_kv_head
            k_BHTD = k_BHTD.repeat_interleave(repeat, dim=1)
            v_BHTD = v_BHTD.repeat_interleave(repeat, dim=1)
        dropout = cfg.dropout if self.training else 0.0
        if attn_mask is None:  # plain causal attention over the T new tokens
            y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True,
                                                    dropout_p=dropout)
        else:
            y_BHTD = F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, attn_mask=attn_mask,
                                                    dropout_p=dropout)
        if head_mask is not None:
            y_BHTD = y_BHTD * head_mask[None, :, None, None]
        return self.wo(y_BHTD.transpose(1, 2).reshape(B, T, cfg.n_head * cfg.head_dim))


class DenseFFN(nn.Module):
    """Position-wise FFN: down(act(up(x))) or, for SwiGLU, down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.mlp_bias)
        self.gate = (nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=cfg.mlp_bias)
                     if cfg.activation == "swiglu" else None)
        self.down = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=cfg.mlp_bias)
        self.down.residual_projection = True
        self.activation_point = nn.Identity()  # hook here to observe / replace activations

    def forward(self, x_BTd: torch.Tensor, unit_mask: torch.Tensor | None = None) -> torch.Tensor:
        act = ACTIVATIONS[self.activation]
        h_BTF = act(self.gate(x_BTd)) * self.up(x_BTd) if self.gate is not None else act(self.up(x_BTd))
        if unit_mask is not None:
            h_BTF = h_BTF * unit_mask
        return self.down(self.activation_point(h_BTF))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.norm1 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, bias=True)
        self.attn = Attention(cfg)
        self.norm2 = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, bias=True)
        self.ffn = DenseFFN(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BTd, rope, attn_mask, kv_cache, masks: Masks | None):
        i = self.layer
        head = masks.head[i] if masks is not None and masks.head is not None else None
        unit = masks.ffn[i] if masks is not None and masks.ffn is not None else None
        hidden = masks.hidden if masks is not None else None
        layer = masks.layer[i] if masks is not None and masks.layer is not None else None

        a = self.attn(self.norm1(x_BTd, hidden), rope, attn_mask, kv_cache, i, head)
        x_BTd = x_BTd + self.dropout(self._scale(a, layer, hidden))
        h = self.norm2(x_BTd, hidden)
        out = self.ffn(h, unit) if unit is not None else self.ffn(h)
        aux = {}
        if isinstance(out, tuple):  # a module with auxiliary losses, e.g. an MoE layer
            out, aux = out
        x_BTd = x_BTd + self.dropout(self._scale(out, layer, hidden))
        return x_BTd, aux

    @staticmethod
    def _scale(y, layer_mask, hidden_mask):
        if layer_mask is not None:
            y = y * layer_mask
        if hidden_mask is not None:
            y = y * hidden_mask
        return y


# --- the model -------------------------------------------------------------------------------------

class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.position == "learned" else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        for layer, spec in (cfg.moe_layers or {}).items():
            self.blocks[int(layer)].ffn = moe_from_spec(cfg.n_embd, spec)
        self.norm_f = Norm(cfg.n_embd, cfg.norm, cfg.norm_eps, bias=True)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One matrix both embeds tokens and scores them (GPT-2; Press & Wolf 2017).
            self.lm_head.weight = self.wte.weight
        self.drop = nn.Dropout(cfg.dropout)
        self.mask_source: nn.Module | None = None  # see the module docstring
        # Recompute each block's activations in the backward pass instead of storing them
        # (less memory, about one extra forward of compute). Set by the trainer.
        self.activation_checkpointing = False
        if cfg.position == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.init_std
        if isinstance(module, nn.Linear):
            # Residual projections add to the stream once per sub-layer: shrink them by
            # 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth (GPT-2).
            if getattr(module, "residual_projection", False):
                std = std / math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Experts):  # E FFNs at once: the down projection is residual
            for w in (module.w_up, module.w_gate):
                if w is not None:
                    nn.init.normal_(w, mean=0.0, std=std)
            nn.init.normal_(module.w_down, mean=0.0, std=std / math.sqrt(2 * self.config.n_layer))

    def num_params(self, exclude_position_embeddings: bool = False) -> int:
        """Parameters counted once (a tied matrix once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_position_embeddings and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6 per weight used in a matmul, plus
        attention's 12 * n_layer * n_head * head_dim * seq_len (PaLM appendix B). Embedding
        lookups are not matmuls: position tables never count, the token table only when tied to
        the output layer. An MoE layer counts its router and the top_k experts a token uses."""
        cfg = self.config
        T = seq_len or cfg.block_size
        n = self.num_params(exclude_position_embeddings=True)
        if not cfg.tie_embeddings:
            n -= self.wte.weight.numel()
        for block in self.blocks:
            if isinstance(block.ffn, MoE):
                n += active_matmul_params(block.ffn) - sum(p.numel() for p in block.ffn.parameters())
        return 6 * n + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    def describe(self) -> ModelConfig:
        """The config that rebuilds this module tree, MoE layers included (for checkpoints). A
        block whose FFN is neither `DenseFFN` nor `MoE` cannot be described: a named error."""
        moe_layers = {}
        for i, block in enumerate(self.blocks):
            if isinstance(block.ffn, MoE):
                moe_layers[str(i)] = moe_spec(block.ffn)
            elif not isinstance(block.ffn, DenseFFN):
                raise TypeError(f"layer {i}'s FFN is a {type(block.ffn).__name__}: minillm "
                                "checkpoints rebuild DenseFFN and MoE layers only")
        return replace(self.config, moe_layers=moe_layers or None)

    def forward(self, idx: torch.Tensor | None = None, targets: torch.Tensor | None = None, *,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                masks: Masks | None = None) -> ModelOutput:
        """Logits (B, T, V) for token ids `idx` (B, T) or embeddings `inputs_embeds` (B, T, d).

        position_ids (B, T): default 0..T-1 after the cached positions. attn_mask: boolean,
        broadcastable to (B, 1, T, cached + T), True where a query may attend a key; default causal.
        targets (B, T): next-token ids; -100 is ignored by the loss."""
        if (idx is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of idx and inputs_embeds")
        x_BTd = self.wte(idx) if inputs_embeds is None else inputs_embeds
        B, T, _ = x_BTd.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if self.wpe is not None and past + T > self.config.block_size:
                raise ValueError(f"sequence of {past + T} positions is longer than block_size "
                                 f"{self.config.block_size}")
            position_ids = torch.arange(past, past + T, device=x_BTd.device).expand(B, T)
        if kv_cache is not None and attn_mask is None and past > 0:
            # New queries see every cached key plus the new keys causally.
            attn_mask = torch.ones(T, past + T, dtype=torch.bool, device=x_BTd.device).tril(past)
        rope = None
        if self.wpe is not None:
            x_BTd = x_BTd + self.wpe(position_ids)
        else:
            angles_BTD = position_ids[..., None].float() * self.inv_freq
            angles_BTD = torch.cat((angles_BTD, angles_BTD), dim=-1)
            rope = (angles_BTD.cos().to(x_BTd.dtype), angles_BTD.sin().to(x_BTd.dtype))
        aux_losses: dict[str, torch.Tensor] = {}
        if masks is None and self.mask_source is not None:
            masks, mask_losses = self.mask_source()
            aux_losses.update(mask_losses)
        hidden = masks.hidden if masks is not None else None
        if hidden is not None:
            x_BTd = x_BTd * hidden
        x_BTd = self.drop(x_BTd)
        checkpointing = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if checkpointing:
                x_BTd, aux = torch.utils.checkpoint.checkpoint(
                    block, x_BTd, rope, attn_mask, kv_cache, masks, use_reentrant=False)
            else:
                x_BTd, aux = block(x_BTd, rope, attn_mask, kv_cache, masks)
            for name, value in aux.items():
                aux_losses[name] = aux_losses.get(name, 0) + value
        if kv_cache is not None:
            kv_cache.advance(T)
        logits = self.lm_head(self.norm_f(x_BTd, hidden))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        return ModelOutput(logits, loss, aux_losses)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.wte.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)


__all__ = ["ModelConfig", "PRESETS", "preset", "ModelSize", "Masks", "ModelOutput", "Norm", "Attention",
           "DenseFFN", "Block", "GPT", "KVCache"]
