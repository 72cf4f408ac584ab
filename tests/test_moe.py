import math

import pytest
import torch
from hypothesis import given, strategies as st

from minillm.generate import generate_ids
from minillm.model import GPT, DenseFFN, ModelConfig
from minillm.moe import (DROPPED, MoEConfig, RoutingPlan, assign_slots, capacity_for, combine,
                         dispatch, load_balancing_loss, plan_from_probs, replace_ffns_with_moe)
from minillm.moefy import balanced_kmeans, merge_moe, moefy_ffn


def random_plan(T, E, k, cf, priority="score", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=dtype)
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=cf, min_capacity=1, priority=priority)
    return plan_from_probs(logits.softmax(-1), logits, cfg)


@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 3), st.sampled_from([0.5, 1.0, 2.0]),
       st.sampled_from(["score", "position"]))
def test_slots_are_unique_within_capacity_and_drops_are_the_overflow(T, E, k, cf, priority):
    k = min(k, E)
    plan = random_plan(T, E, k, cf, priority)
    assert plan.capacity == max(math.ceil(cf * k * T / E), 1)
    kept = plan.kept
    pairs = set(zip(plan.expert[kept].tolist(), plan.slot[kept].tolist()))
    assert len(pairs) == int(kept.sum())  # no two entries share a slot
    assert all(0 <= s < plan.capacity for _, s in pairs)
    loads = torch.bincount(plan.expert, minlength=E)
    assert int((~kept).sum()) == int((loads - plan.capacity).clamp(min=0).sum())


def test_position_priority_is_first_come_and_score_priority_prefers_high_scores():
    probs = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.7, 0.3]])
    for priority, winner in (("position", 0), ("score", 1)):
        cfg = MoEConfig(num_experts=2, top_k=1, capacity_factor=2 / 3, min_capacity=1, priority=priority)
        plan = plan_from_probs(probs, probs.log(), cfg)  # capacity 1: one token gets expert 0
        assert plan.capacity == 1
        assert plan.token[plan.kept].tolist() == [winner]


@given(st.integers(1, 30), st.integers(1, 5), st.integers(1, 3), st.integers(1, 8))
def test_dispatch_combine_identity_when_dropless(T, E, k, d):
    k = min(k, E)
    plan = random_plan(T, E, k, cf=0.0)
    x = torch.randn(T, d)
    y = combine(dispatch(x, plan), plan, T)  # identity experts, weights summing to 1
    torch.testing.assert_close(y, x)


def test_dispatch_combine_gradcheck_float64():
    plan = random_plan(7, 3, 2, cf=1.0, dtype=torch.float64)
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    w = plan.weight.clone().requires_grad_(True)

    def f(x, w):
        p = RoutingPlan(plan.token, plan.expert, plan.slot, w, plan.probs_TE, plan.logits_TE,
                        plan.capacity, plan.num_experts, plan.top_k)
        return combine(dispatch(x, p) * 1.5, p, 7)
    assert torch.autograd.gradcheck(f, (x, w))


def test_balance_loss_is_one_when_uniform():
    T, E = 64, 4
    probs = torch.full((T, E), 0.25)
    plan = plan_from_probs(probs, probs.log(), MoEConfig(num_experts=E, top_k=1))
    plan.expert = torch.arange(T) % E  # perfectly balanced assignment
    assert load_balancing_loss(plan).item() == pytest.approx(1.0)


def test_assign_slots_orders_by_priority():
    expert = torch.tensor([0, 0, 1, 0])
    slot = assign_slots(expert, torch.tensor([3, 1, 0, 2]), 2, capacity=2)
    assert slot.tolist() == [DROPPED, 0, 0, 1]
    assert capacity_for(100, MoEConfig(num_experts=8, top_k=2, capacity_factor=1.25)) == 32


# --- the layer in a model --------------------------------------------------------------------------------

def moe_model(**moe_kw):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=2, n_head=2, n_embd=32))
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, capacity_factor=1.0, **moe_kw)
    return replace_ffns_with_moe(model, cfg, layers=[0, 1])


def test_random_experts_start_like_the_dense_ffn_they_replace():
    """Expert up / down projections get the dense FFN's init, down scaled by 1/sqrt(2 n_layer)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=8, n_head=2, n_embd=64))
    dense = model.blocks[1].ffn
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=dense.up.out_features)
    experts = replace_ffns_with_moe(model, cfg, layers=[1]).blocks[1].ffn.experts
    for mine, theirs in ((experts.w_up, dense.up.weight), (experts.w_down, dense.down.weight)):
        assert abs(float(mine.detach().std() / theirs.detach().std()) - 1) < 0.05
    assert abs(float(experts.w_down.detach().std()) - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8) = 1/4


def test_a_model_built_from_its_moe_config_inits_experts_like_the_dense_ffn():
    """GPT(config with moe_layers), trained from scratch, starts its experts as
    replace_ffns_with_moe does: N(0, init_std), the down projection scaled by 1/sqrt(2 n_layer)."""
    torch.manual_seed(0)
    base = GPT(ModelConfig(vocab_size=97, block_size=64, n_layer=8, n_head=2, n_embd=64))
    described = replace_ffns_with_moe(base, MoEConfig(num_experts=4, top_k=2, expert_hidden=256),
                                      layers=[1]).describe()
    experts = GPT(described).blocks[1].ffn.experts
    assert abs(float(experts.w_up.detach().std()) - 0.02) < 0.001
    assert abs(float(experts.w_down.detach().std()) - 0.02 / 4) < 0.001  # 1/sqrt(2 * 8) = 1/4


def test_moe_model_trains_and_reports_aux_losses():
    model = moe_model()
    x = torch.randint(0, 97, (4, 24))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        out = model(x[:, :-1], x[:, 1:])
        loss = out.loss + sum(out.aux_losses.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert set(out.aux_losses) == {"moe_balance", "moe_z"}
    assert out.loss.item() < 1.0
    assert model.blocks[0].ffn.router.gate.weight.grad is not None


def test_eval_routes_dropless_so_generation_is_exact():
    model = moe_model().eval()
    prompts = [[1, 2, 3, 4], [5, 6]]
    assert generate_ids(model, prompts, 8, temperature=0) == \
        generate_ids(model, prompts, 8, temperature=0, use_cache=False)
    x = torch.randint(0, 97, (3, 10))
    alone = model(x[:1]).logits
    torch.testing.assert_close(model(x).logits[:1], alone)  # independent of the batch
    assert model.blocks[0].ffn.stats["dropped_fraction"] == 0


# --- MoEfication ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_moefication_top_all_equals_dense_and_merge_is_exact(activation):
    torch.manual_seed(0)
    ffn = DenseFFN(ModelConfig(n_embd=32, n_head=2, ffn_hidden=128, activation=activation))
    moe = moefy_ffn(ffn, num_experts=8, top_k=8).eval()
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(moe(x)[0], ffn(x), atol=1e-5, rtol=1e-5)
    merged = merge_moe(moe)
    for (name, a), b in zip(ffn.state_dict().items(), merged.state_dict().values()):
        assert torch.equal(a, b), name


def test_balanced_kmeans_is_balanced_and_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 5
    points = torch.cat([c + torch.randn(25, 16, generator=g) for c in centers])
    labels = balanced_kmeans(points, 4)
    assert torch.bincount(labels).tolist() == [25] * 4
    for block in labels.view(4, 25):  # each planted cluster is one k-means cluster
        assert len(set(block.tolist())) == 1


def test_moefied_router_prefers_the_experts_of_active_units():
    torch.manual_seed(0)
    ffn = DenseFFN(ModelConfig(n_embd=32, n_head=2, ffn_hidden=64, activation="relu", mlp_bias=False))
    moe = moefy_ffn(ffn, num_experts=4, top_k=1)
    x = torch.randn(200, 32)
    act = torch.relu(ffn.up(x))  # (200, 64)
    perm = moe.unit_permutation
    per_expert = act[:, perm].view(200, 4, 16).sum(-1)
    chosen = moe.router.gate(x).argmax(-1)
    # the routed expert holds more activation than a random one would, on average
    assert per_expert[torch.arange(200), chosen].mean() > per_expert.mean() * 1.2
