import pytest
import torch

from minillm.model import GPT, Masks, ModelConfig, preset, rope_inv_freq

from minillm.checkpoint import load_model, save_model
from minillm.tokenizer import train_bpe

SMALL = {
    "gpt": dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32),
    "llama": dict(vocab_size=97, block_size=32, n_layer=3, n_head=4, n_embd=32, ffn_hidden=48,
                  activation="swiglu", norm="rmsnorm", position="rope", attn_bias=False,
                  mlp_bias=False, tie_embeddings=False),
    "llama-gqa": dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=24,
                      head_dim=10, activation="swiglu", norm="rmsnorm", position="rope",
                      tie_embeddings=False, rope_scaling={"type": "linear", "factor": 2.0}),
    "relu": dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=16, activation="relu"),
}


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return GPT(ModelConfig(**{**SMALL[name], **kw})).eval()


@pytest.mark.parametrize("name,expected", [("gpt2", 124_439_808), ("llama2-7b", 6_738_415_616)])
def test_published_parameter_counts(name, expected):
    with torch.device("meta"):
        model = GPT(preset(name))
    assert model.num_params() == expected


def test_flops_per_token_counts_weights_and_attention():
    with torch.device("meta"):
        model = GPT(preset("gpt2"))
    n = 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 12 * 64 * 1024


def test_causality_future_tokens_do_not_change_the_past():
    for name in SMALL:
        model = make(name)
        x = torch.randint(0, 97, (2, 20))
        y = x.clone()
        y[:, 12:] = torch.randint(0, 97, (2, 8))
        torch.testing.assert_close(model(x).logits[:, :12], model(y).logits[:, :12])


def test_gqa_equals_multihead_with_repeated_kv_heads():
    gqa = make("llama-gqa")
    mha = make("llama-gqa", n_kv_head=4)
    sd = gqa.state_dict()
    for i in range(2):
        for w in ("wk", "wv"):
            key = f"blocks.{i}.attn.{w}.weight"
            sd[key] = sd[key].view(2, 10, 24).repeat_interleave(2, dim=0).reshape(40, 24)
            key = f"blocks.{i}.attn.{w}.bias"
            sd[key] = sd[key].view(2, 10).repeat_interleave(2, dim=0).reshape(40)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(x).logits, mha(x).logits)


def test_rope_scaling_rules():
    base = rope_inv_freq(ModelConfig(n_embd=64, n_head=1))
    linear = rope_inv_freq(ModelConfig(n_embd=64, n_head=1, rope_scaling={"type": "linear", "factor": 4}))
    torch.testing.assert_close(linear, base / 4)
    llama3 = rope_inv_freq(ModelConfig(n_embd=64, n_head=1, rope_theta=500000.0, rope_scaling={
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}))
    plain = rope_inv_freq(ModelConfig(n_embd=64, n_head=1, rope_theta=500000.0))
    wavelen = 2 * torch.pi / plain
    short, long = wavelen < 8192 / 4, wavelen > 8192
    torch.testing.assert_close(llama3[short], plain[short])  # high frequencies untouched
    torch.testing.assert_close(llama3[long], plain[long] / 8)  # low frequencies slowed by factor
    mid = ~short & ~long
    assert ((llama3[mid] < plain[mid]) & (llama3[mid] > plain[mid] / 8)).all()


def test_ignore_index_and_inputs_embeds():
    model = make("llama")
    x = torch.randint(0, 97, (2, 10))
    targets = torch.randint(0, 97, (2, 10))
    masked = targets.clone()
    masked[:, :4] = -100
    logits = model(x).logits
    expected = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 97), targets[:, 4:].reshape(-1))
    torch.testing.assert_close(model(x, masked).loss, expected)
    torch.testing.assert_close(model(inputs_embeds=model.wte(x)).logits, logits)


def test_tiny_model_overfits_one_batch():
    model = make("gpt").train()
    x = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        loss = model(x[:, :-1], x[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


# --- hooks and replaceable FFNs --------------------------------------------------------------------

def test_hooks_see_the_ffn_activations_and_can_replace_them():
    model = make("relu")
    x = torch.randint(0, 97, (2, 8))
    seen = {}
    block = model.blocks[1]
    handle = block.ffn.activation_point.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    base = model(x).logits
    handle.remove()
    # Recompute layer 1's FFN activation by hand from the residual stream entering its FFN.
    captured = {}
    block.norm2.register_forward_hook(lambda m, i, o: captured.setdefault("in", o))
    model(x)
    expected = torch.relu(block.ffn.up(captured["in"]))
    torch.testing.assert_close(seen["h"], expected)
    assert (seen["h"] == 0).any()  # ReLU: sparse activations
    # Zeroing the activations through the hook equals removing the FFN's contribution (bias stays).
    block.ffn.activation_point.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
    zeroed = model(x).logits
    block.ffn.down.weight.data.zero_()
    model_hooks_removed = model(x).logits
    torch.testing.assert_close(zeroed, model_hooks_removed)
    assert not torch.allclose(zeroed, base)


def test_replaced_ffn_with_aux_losses_is_collected():
    model = make("gpt")

    class WithAux(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x), {"balance": x.pow(2).mean()}

    x = torch.randint(0, 97, (2, 8))
    base = model(x)
    for block in model.blocks:
        block.ffn = WithAux(block.ffn)
    out = model(x)
    torch.testing.assert_close(out.logits, base.logits)
    assert set(out.aux_losses) == {"balance"} and out.aux_losses["balance"] > 0


# --- masks equal physical removal ---------------------------------------------------------------------

def compact(model: GPT, keep_hidden, keep_heads, keep_units, keep_layers) -> GPT:
    """Reference: a new model holding only the kept parts (same count of heads / units per layer)."""
    cfg = model.config
    hd = cfg.head_dim
    new_cfg = ModelConfig(**{**cfg.to_dict(), "n_embd": len(keep_hidden), "head_dim": hd,
                             "n_head": len(keep_heads[0]), "n_kv_head": len(keep_heads[0]),
                             "ffn_hidden": len(keep_units[0]), "n_layer": len(keep_layers)})
    small = GPT(new_cfg).eval()
    d = keep_hidden
    sd = model.state_dict()
    out = {"wte.weight": sd["wte.weight"][:, d], "norm_f.weight": sd["norm_f.weight"][d],
           "lm_head.weight": sd["lm_head.weight"][:, d]}
    if "wpe.weight" in sd:
        out["wpe.weight"] = sd["wpe.weight"][:, d]
    if "norm_f.bias" in sd:
        out["norm_f.bias"] = sd["norm_f.bias"][d]
    for new_i, i in enumerate(keep_layers):
        heads = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads[i]])
        units = keep_units[i]
        p, q = f"blocks.{i}.", f"blocks.{new_i}."
        rows = {"attn.wq": heads, "attn.wk": heads, "attn.wv": heads, "ffn.up": units,
                "ffn.gate": units}
        for name, r in rows.items():
            if p + name + ".weight" in sd:
                out[q + name + ".weight"] = sd[p + name + ".weight"][r][:, d]
                if p + name + ".bias" in sd:
                    out[q + name + ".bias"] = sd[p + name + ".bias"][r]
        for name, cols in (("attn.wo", heads), ("ffn.down", units)):
            out[q + name + ".weight"] = sd[p + name + ".weight"][d][:, cols]
            if p + name + ".bias" in sd:
                out[q + name + ".bias"] = sd[p + name + ".bias"][d]
        for norm in ("norm1", "norm2"):
            out[q + norm + ".weight"] = sd[p + norm + ".weight"][d]
            if p + norm + ".bias" in sd:
                out[q + norm + ".bias"] = sd[p + norm + ".bias"][d]
    small.load_state_dict(out)
    return small


@pytest.mark.parametrize("name", ["gpt", "llama"])
def test_masks_equal_physically_removed_parts(name):
    model = make(name, seed=1)
    cfg = model.config
    for p in model.parameters():  # non-trivial norms and biases
        p.data.add_(0.05 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    keep_hidden = torch.randperm(cfg.n_embd, generator=g)[:20].sort().values
    keep_heads = [torch.randperm(cfg.n_head, generator=g)[:3].sort().values for _ in range(cfg.n_layer)]
    keep_units = [torch.randperm(cfg.ffn_hidden, generator=g)[:30].sort().values
                  for _ in range(cfg.n_layer)]
    keep_layers = [0, 2]
    masks = Masks(layer=torch.zeros(cfg.n_layer), head=torch.zeros(cfg.n_layer, cfg.n_head),
                  ffn=torch.zeros(cfg.n_layer, cfg.ffn_hidden), hidden=torch.zeros(cfg.n_embd))
    masks.hidden[keep_hidden] = 1
    masks.layer[keep_layers] = 1
    for i in range(cfg.n_layer):
        masks.head[i, keep_heads[i]] = 1
        masks.ffn[i, keep_units[i]] = 1
    x = torch.randint(0, 97, (2, 16))
    small = compact(model, keep_hidden, keep_heads, keep_units, keep_layers)
    torch.testing.assert_close(model(x, masks=masks).logits, small(x).logits, atol=1e-5, rtol=1e-5)
    # all-ones masks change nothing
    ones = Masks(*(torch.ones_like(m) for m in (masks.layer, masks.head, masks.ffn, masks.hidden)))
    torch.testing.assert_close(model(x, masks=ones).logits, model(x).logits, atol=1e-5, rtol=1e-5)


def test_checkpoint_is_self_contained(tmp_path):
    tok = train_bpe(["a checkpoint carries its tokenizer"] * 3, vocab_size=280)
    model = make("llama", vocab_size=tok.vocab_size)
    save_model(tmp_path / "m.pt", model, tok, extra={"step": 3})
    loaded, loaded_tok, extra = load_model(tmp_path / "m.pt")
    x = torch.randint(0, tok.vocab_size, (1, 8))
    torch.testing.assert_close(loaded.eval()(x).logits, model(x).logits)
    assert loaded_tok.mergeable_ranks == tok.mergeable_ranks and extra == {"step": 3}
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_model(tmp_path / "nope.pt")


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="activation must be one of"):
        ModelConfig(activation="tanh")
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt5")
