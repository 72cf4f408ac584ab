"""Rectify-Router's plan transforms (minillm/methods/rectify_router.py) and its small-scale experiment
(scripts/rectify_router.py)."""

import pytest
import torch
from hypothesis import given, strategies as st

from minillm.moe import MoE, MoEConfig, plan_from_probs
from minillm.methods.rectify_router import FillInRectification, IntraGPURectification
from tests.test_moe import random_plan


def skewed_moe(transforms, E=4, k=2):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=E, top_k=k, expert_hidden=16, capacity_factor=1.0, min_capacity=1)
    moe = MoE(16, cfg, plan_transforms=transforms)
    with torch.no_grad():
        moe.router.gate.weight[0] += 1.5  # overload expert 0, leave others under-full
    return moe


@pytest.mark.parametrize("mode", ["all", "any", "all_but_one"])
def test_intra_gpu_rectification_leaves_no_token_dropped(mode):
    x = torch.randn(1, 40, 16)
    vanilla = skewed_moe([])
    vanilla(x)
    assert vanilla.stats["dropped_fraction"] > 0
    moe = skewed_moe([IntraGPURectification(num_devices=2, dropped_when=mode)])
    moe(x)
    assert moe.stats["dropped_tokens_fraction"] == 0


def test_intra_gpu_output_of_a_fully_dropped_token_is_its_local_expert():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=8, capacity_factor=0.25, min_capacity=1)
    moe = MoE(8, cfg, plan_transforms=[IntraGPURectification(num_devices=2)])
    x = torch.randn(1, 8, 8)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[0, 0] = 10.0
        x[..., 0] = 1.0  # every token prefers expert 0: one fits, seven are dropped
    y, _ = moe(x)
    plan = moe.router(x.view(8, 8))
    probs = plan.probs_TE
    for t in range(8):
        if t == int(plan.token[plan.kept][0]):
            continue
        device = t * 2 // 8
        local = range(device * 2, device * 2 + 2)
        j = max(local, key=lambda e: probs[t, e])
        expected = moe.experts(x.view(8, 8)[t].expand(4, 1, 8).contiguous())[j, 0]
        torch.testing.assert_close(y[0, t], expected)  # (s p_j E_j) / (s p_j)


def test_fill_in_fills_every_slot_when_tokens_suffice():
    x = torch.randn(1, 40, 16)
    vanilla = skewed_moe([])
    vanilla(x)
    assert vanilla.stats["padding_fraction"] > 0
    for variant in ("global", "top_k_plus_one"):
        moe = skewed_moe([FillInRectification(variant)])
        moe(x)
        if variant == "global":
            assert moe.stats["padding_fraction"] == 0
        else:
            assert moe.stats["padding_fraction"] < vanilla.stats["padding_fraction"]


def test_rectification_changes_nothing_without_overflow_or_padding():
    T, E, k = 16, 4, 2
    probs = torch.full((T, E), 0.01)
    for t in range(T):  # each expert is chosen exactly 8 times = capacity
        probs[t, t % E] = 0.6
        probs[t, (t + 1) % E] = 0.37
    cfg = MoEConfig(num_experts=E, top_k=k, capacity_factor=1.0, min_capacity=1)
    plan = plan_from_probs(probs, probs.log(), cfg)
    assert bool(plan.kept.all()) and plan.capacity == 8
    for transform in (IntraGPURectification(2, "any"), FillInRectification()):
        new = transform(plan)
        assert torch.equal(new.token, plan.token) and torch.equal(new.slot, plan.slot)
        assert torch.equal(new.weight, plan.weight)


def test_moe_with_rectification_runs_under_bf16_autocast():
    moe = skewed_moe([IntraGPURectification(num_devices=2, dropped_when="any"), FillInRectification()])
    x = torch.randn(1, 40, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = moe(x)
    assert torch.isfinite(y.float()).all() and moe.stats["dropped_tokens_fraction"] == 0
    (y.float().sum() + sum(aux.values())).backward()


def test_intra_gpu_never_picks_an_expert_the_token_kept():
    plan = random_plan(64, 4, 2, cf=0.5, seed=3)
    new = IntraGPURectification(num_devices=2, dropped_when="any")(plan)
    n = 64 * 2
    kept_pairs = set(zip(plan.token[plan.kept].tolist(), plan.expert[plan.kept].tolist()))
    added = set(zip(new.token[n:].tolist(), new.expert[n:].tolist()))
    assert added and not added & kept_pairs
    k1 = random_plan(64, 4, 1, cf=0.5, seed=3)  # k = 1: "all_but_one" rectifies only dropped tokens
    new1 = IntraGPURectification(2, "all_but_one")(k1)
    assert len(new1.token) - 64 == int((~k1.kept).sum())


def added_entries_are_local_and_new(plan, new, G):
    """Every entry Intra-GPU adds is on an expert of the token's own device, one the token did not
    keep, and a token gets at most one."""
    T, E = plan.probs_TE.shape
    n = len(plan.token)
    kept = set(zip(plan.token[plan.kept].tolist(), plan.expert[plan.kept].tolist()))
    added = list(zip(new.token[n:].tolist(), new.expert[n:].tolist()))
    for t, e in added:
        assert e // (E // G) == t * G // T, f"token {t} got expert {e} from another device"
        assert (t, e) not in kept, f"token {t} got its kept expert {e} again"
    assert len({t for t, _ in added}) == len(added)
    return added


def test_intra_gpu_reproduction_of_issue_10():
    """T=16, E=4, k=2, 4 devices, cf 0.5, "any", seed 0: tokens 1, 2 and 14 have no local expert
    left (their only local expert is one they kept) and must stay as they were."""
    plan = random_plan(16, 4, 2, cf=0.5, seed=0)
    new = IntraGPURectification(num_devices=4, dropped_when="any")(plan)
    added = added_entries_are_local_and_new(plan, new, G=4)
    assert {1, 2, 14}.isdisjoint(t for t, _ in added)
    assert added  # other tokens are rectified
    entry_TK = torch.arange(32).view(2, 16).t()
    for t in (1, 2, 14):  # untouched: same weights, still missing one expert
        assert torch.equal(new.weight[entry_TK[t]], plan.weight[entry_TK[t]])


@given(st.integers(1, 40), st.sampled_from([(4, 1), (4, 2), (4, 4), (8, 4)]), st.integers(1, 2),
       st.sampled_from([0.25, 0.5, 1.0]), st.sampled_from(["all", "any", "all_but_one"]),
       st.integers(0, 1000))
def test_intra_gpu_adds_only_local_new_experts(T, EG, k, cf, mode, seed):
    E, G = EG
    plan = random_plan(T, E, k, cf, seed=seed)
    added_entries_are_local_and_new(plan, IntraGPURectification(G, mode)(plan), G)


def test_intra_gpu_max_per_expert_keeps_the_highest_probabilities():
    plan = random_plan(64, 4, 1, cf=0.25, seed=1)
    free = IntraGPURectification(num_devices=2)(plan)
    bounded = IntraGPURectification(num_devices=2, max_per_expert=3)(plan)
    n = len(plan.token)
    loads_free = torch.bincount(free.expert[n:], minlength=4)
    loads = torch.bincount(bounded.expert[n:], minlength=4)
    assert loads_free.max() > 3  # unbounded: capacity does not limit rectified entries
    assert torch.equal(loads, loads_free.clamp(max=3))
    for e in range(4):  # the chosen ones are the best of those the unbounded transform sent there
        p_free = free.probs_TE[free.token[n:][free.expert[n:] == e], e]
        p = bounded.probs_TE[bounded.token[n:][bounded.expert[n:] == e], e]
        assert torch.equal(p.sort(descending=True).values, p_free.sort(descending=True).values[:3])


# --- the experiment script --------------------------------------------------------------------------

@pytest.mark.slow
def test_rectify_router_script_reruns_into_the_same_folder(tmp_path):
    """Issue 10, bug 6: a second run into the same folder starts every run over and reproduces the
    first; each run evaluates once dropless (the trainer's end-of-training evaluation) and once at
    capacity; the rectifications do what they promise in the training statistics."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, str(repo / "scripts" / "rectify_router.py"),
            "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "out"),
            "--max-files", "15", "--vocab-size", "300", "--val-fraction", "0.2",
            "--max-steps", "3", "--n-layer", "2", "--n-embd", "16", "--expert-hidden", "16",
            "--num-experts", "4", "--block-size", "16", "--batch-size", "4", "--seeds", "1",
            "--eval-batches", "2", "--capacity-factors", "0.5"]
    runs = []
    for _ in range(2):
        proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append([json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()])
        assert "| top-1 + both | 0.5 |" in (tmp_path / "out" / "table.md").read_text()
    first, second = ([{k: v for k, v in r.items() if k != "seconds"} for r in rs] for rs in runs)
    assert first == second and len(first) == 5
    for run_dir in (tmp_path / "out").iterdir():
        if run_dir.is_dir():
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            assert sum("val_loss" in r for r in records) == 2, run_dir.name  # dropless, capacity
    for r in first:
        if "Intra-GPU" in r["variant"] or "both" in r["variant"]:
            assert r["dropped_tokens_fraction"] == 0
        if "Fill-in" in r["variant"] or "both" in r["variant"]:
            assert r["padding_fraction"] == 0
        if r["variant"] == "top-1" and r["capacity_factor"] == 0.5:
            assert r["dropped_fraction"] >= 0.5
