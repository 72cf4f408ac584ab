"""Emergent modularity: AP, the hypergeometric tail, Spearman and the assignment against brute
force; a planted toy whose one expert carries a function is found, and perturbing it hurts that
function only; bad input is a named error; the evidence script at a tiny size."""

import dataclasses
import importlib.util
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from sklearn.metrics import average_precision_score

from minillm.errors import UserError
from minillm.hf import save_hf, save_hf_tokenizer
from minillm.model import GPT, ModelConfig
from minillm.checkpoint import load_model
from minillm.methods.modularity import (ProbingSet, average_precision, collect_activations, emergence,
                                        expert_predictivity, expert_units, find_functional_experts,
                                        function_loss, hypergeom_sf, match_partition,
                                        min_cost_assignment, modularity_summary,
                                        moefication_partitions, permute_units, perturbation_layers,
                                        predictivity, random_baseline, rankdata, shuffle_units,
                                        spearman)
from minillm.moefy import moefy_ffn

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "modularity.py"


def brute_ap(scores, y):
    """Mean over positives of the precision among examples scored at least as high."""
    return np.mean([np.mean(y[scores >= s]) for s in scores[y == 1]])


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 1)), min_size=2, max_size=40))
def test_average_precision_matches_brute_force_and_scikit_learn_with_ties(pairs):
    scores = np.array([s for s, _ in pairs], dtype=float)  # few distinct values: many ties
    y = np.array([c for _, c in pairs])
    if y.sum() == 0:
        return
    assert average_precision(scores, y) == pytest.approx(brute_ap(scores, y), abs=1e-12)
    assert average_precision(scores, y) == pytest.approx(average_precision_score(y, scores), abs=1e-12)


def test_average_precision_columns_and_predictivity():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 50)
    acts = rng.normal(size=(50, 6))
    acts[:, 0] = y  # perfectly predictive
    acts[:, 1] = -y  # perfectly predictive in the other direction: AP(1 - y) is 1
    columns = average_precision(acts, y)
    for j in range(6):
        assert columns[j] == pytest.approx(brute_ap(acts[:, j], y))
    pred = predictivity(acts, y)
    assert pred[0] == pred[1] == 1.0 and (pred[2:] < 1).all()


@pytest.mark.parametrize("M,n,N", [(10, 3, 4), (12, 6, 6), (7, 7, 2), (9, 2, 9), (20, 5, 1)])
def test_hypergeometric_tail_equals_exact_sums(M, n, N):
    for k in range(-1, min(n, N) + 2):
        exact = sum(Fraction(math.comb(n, x) * math.comb(M - n, N - x), math.comb(M, N))
                    for x in range(max(k, 0), min(n, N) + 1))
        assert hypergeom_sf(k, M, n, N) == pytest.approx(float(exact), rel=1e-12, abs=1e-300)


def test_hypergeometric_tail_at_paper_size_is_finite_and_tiny():
    # 3072 neurons, experts of 192, the top 1% (31) all in one expert: exact binomials overflow
    p = hypergeom_sf(31, 3072, 192, 31)
    assert 0 < p < 1e-30


def test_rankdata_spearman_and_assignment_against_brute_force():
    assert list(rankdata([3, 1, 3, 2])) == [3.5, 1, 3.5, 2]
    rng = np.random.default_rng(1)
    a, b = rng.permutation(12), rng.permutation(12)
    d = rankdata(a) - rankdata(b)
    assert spearman(a, b) == pytest.approx(1 - 6 * (d * d).sum() / (12 * (144 - 1)))
    for n in (1, 3, 5):
        cost = rng.integers(0, 10, (n, n)).astype(float)
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assignment = min_cost_assignment(cost)
        assert sorted(assignment) == list(range(n))
        assert sum(cost[i, assignment[i]] for i in range(n)) == best


def test_matched_partition_and_emergence_recover_relabelled_experts():
    rng = np.random.default_rng(2)
    part = np.repeat(np.arange(4), 8)
    relabelled = np.array([2, 0, 3, 1])[part]  # the same clusters under other names
    assert np.array_equal(match_partition(relabelled, part), part)
    pred = {0: {"f": rng.random(32), "g": rng.random(32)}}
    rows = emergence([pred, pred], [{0: relabelled}, {0: part}])
    levels = {"neuron": 1.0, "expert_final": 1.0, "expert_matched": 1.0, "random": 1.0}
    assert rows == [{**levels, "by_function": {"f": levels, "g": levels}}]
    noisy = {0: {f: p + rng.normal(0, 0.3, 32) for f, p in pred[0].items()}}
    row = emergence([pred, noisy], [{0: part}, {0: part}])[0]
    assert row["neuron"] < 1 and -1 <= row["expert_final"] <= 1


def test_emergence_is_the_official_mean_of_per_layer_per_function_spearman():
    """One Spearman per (layer, sub-function), averaged over layers per function and then over
    functions; not one Spearman of everything pooled (which differs on this data)."""
    rng = np.random.default_rng(3)
    part = np.repeat(np.arange(4), 8)
    a = {l: {f: rng.random(32) + 3 * (f == "g") for f in ("f", "g")} for l in (0, 1)}
    b = {l: {"f": a[l]["f"] + rng.normal(0, 0.5, 32), "g": rng.random(32) + 3} for l in (0, 1)}
    row = emergence([a, b], [{0: part, 1: part}, {0: part, 1: part}], random_repeats=3)[0]
    for f in ("f", "g"):
        want = np.mean([spearman(a[l][f], b[l][f]) for l in (0, 1)])
        assert row["by_function"][f]["neuron"] == pytest.approx(want)
        want = np.mean([spearman(expert_predictivity(a[l][f], part), expert_predictivity(b[l][f], part))
                        for l in (0, 1)])
        assert row["by_function"][f]["expert_final"] == pytest.approx(want)
    assert row["neuron"] == pytest.approx(np.mean([row["by_function"][f]["neuron"] for f in "fg"]))
    pooled = spearman(np.concatenate([a[l][f] for l in (0, 1) for f in "fg"]),
                      np.concatenate([b[l][f] for l in (0, 1) for f in "fg"]))
    assert abs(pooled - row["neuron"]) > 0.2  # pooling the functions' offsets inflates it
    assert -1 <= row["random"] <= 1


# --- a planted toy: expert 1 of layer 0 alone detects the trigger token and answers for it -------------

TRIGGER, YES, NO, SPARE = 5, 1, 0, 15


def planted_model() -> GPT:
    """One layer, attention silenced, one-hot embeddings. FFN units 8-15 (expert 1 of four experts
    of 8) fire on the trigger token and write +1 on a spare dimension that the output layer reads
    as YES minus NO; the other units have random inputs and write nothing."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=16, ffn_hidden=32,
                      activation="relu", tie_embeddings=False)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.blocks[0].norm1.weight.fill_(1)
        model.blocks[0].norm2.weight.fill_(1)
        model.norm_f.weight.fill_(1)
        model.wte.weight[:14, :14] = 3 * torch.eye(14)
        ffn = model.blocks[0].ffn
        ffn.up.weight.normal_(0, 0.3)
        ffn.up.weight[8:16] = 0
        ffn.up.weight[8:16, TRIGGER] = 1
        ffn.up.bias[8:16] = -1
        ffn.down.weight[SPARE, 8:16] = 1
        ffn.down.bias[SPARE] = -1
        model.lm_head.weight[YES, SPARE] = 1
        model.lm_head.weight[NO, SPARE] = -1
    return model


def planted_probe(n=64, seed=0) -> ProbingSet:
    """Prompts of random tokens ending with the trigger (label 1, answer YES) or not (0, NO)."""
    rng = np.random.default_rng(seed)
    others = [t for t in range(2, 14) if t != TRIGGER]
    tokens, labels = [], []
    for i in range(n):
        label = i % 2
        prompt = list(rng.choice(others, 5)) + [TRIGGER if label else int(rng.choice(others))]
        tokens.append([int(t) for t in prompt] + [YES if label else NO])
        labels.append(label)
    return ProbingSet("trigger", tokens, np.array(labels), answer_start=[6] * n)


def test_planted_expert_is_found_and_perturbing_it_hurts_its_function_only():
    model, probe = planted_model(), planted_probe()
    acts = collect_activations(model, probe, batch_size=10)  # streamed in several batches
    assert acts[0].shape == (64, 32)
    pred = predictivity(acts[0], probe.labels)
    assert (pred[8:16] == 1).all() and (pred[np.r_[0:8, 16:32]] < 1).all()
    partition = np.repeat(np.arange(4), 8)
    test = find_functional_experts(pred, partition, share=0.25, alpha=1e-3)
    assert test.functional.tolist() == [False, True, False, False]
    assert test.counts.tolist() == [0, 8, 0, 0] and test.expected.tolist() == [2, 2, 2, 2]
    summary = modularity_summary({0: {"trigger": pred}}, {0: partition}, share=0.25)
    assert summary["functional_share"] == 0.25 and summary["extent"] == 4.0
    assert random_baseline({0: {"trigger": pred}}, {0: partition}, share=0.25)["functional_share"] < 0.05

    units = expert_units({0: test}, {0: partition}, k=2)  # only the functional one of the top 2
    assert units[0].tolist() == list(range(8, 16))
    clean = function_loss(model, probe)
    for method in ("shuffle", "permute"):
        assert function_loss(model, probe, {0: units[0]}, method=method) > clean + 0.3
        # neurons that write nothing: perturbing them changes nothing at all
        assert function_loss(model, probe, {0: np.arange(16, 32)}, method=method) == clean


def test_official_shuffle_keeps_the_pool_scales_it_by_var_and_mixes_examples_positions_neurons():
    """The official perturbation (Perturbation4T5/glue_inf.py): the chosen neurons' values at the
    batch's real tokens are shuffled as one list and multiplied by var, so the perturbed values are
    var x the same multiset: mean var x, variance var^2 x. Everything else is untouched."""
    B, T, U = 6, 5, 10
    # each value names its source: example b, position t, neuron u
    h_BTU = (100 * torch.arange(B)[:, None, None] + 10 * torch.arange(T)[None, :, None]
             + torch.arange(U)[None, None, :]).float() + 0.5
    lengths = torch.tensor([5, 3, 5, 2, 4, 5])
    valid_BT = torch.arange(T)[None, :] < lengths[:, None]
    units = torch.tensor([1, 4, 7])
    out = shuffle_units(h_BTU, units, valid_BT, 4.0, torch.Generator().manual_seed(0))
    pool, new = h_BTU[valid_BT][:, units], out[valid_BT][:, units]
    assert torch.equal(new.flatten().sort().values, (4 * pool.flatten()).sort().values)
    assert float(new.mean()) == pytest.approx(4 * float(pool.mean()), rel=1e-6)
    assert float(new.var()) == pytest.approx(16 * float(pool.var()), rel=1e-6)
    others = torch.tensor([u for u in range(U) if u not in units])
    assert torch.equal(out[:, :, others], h_BTU[:, :, others])
    assert torch.equal(out[~valid_BT], h_BTU[~valid_BT])  # padding is not in the pool
    source = (new / 4 - 0.5).long()
    b_src, t_src, u_src = source // 100, source // 10 % 10, source % 10
    b_here = torch.arange(B)[:, None, None].expand(B, T, 3)[valid_BT]
    t_here = torch.arange(T)[None, :, None].expand(B, T, 3)[valid_BT]
    assert (b_src != b_here).any() and (t_src != t_here).any() and (u_src != units).any()
    assert torch.isin(u_src, units).all()  # only chosen neurons' values enter the pool
    # the earlier option: each neuron over examples, position by position: values stay in place
    perm = torch.tensor([3, 0, 1, 5, 2, 4])
    kept = permute_units(h_BTU, units, perm)
    assert torch.equal(kept[:, :, units], h_BTU[perm][:, :, units])


def test_shuffle_through_the_model_hooks_has_the_official_statistics():
    """What the down projection receives under `function_loss(..., method="shuffle")`: at the
    chosen neurons, 4 x the clean activations' mean and 16 x their variance; other neurons as
    clean."""
    model, probe = planted_model(), planted_probe()
    seen = []
    hook = model.blocks[0].ffn.down.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    units = np.array([2, 9, 10, 20, 31])
    function_loss(model, probe)
    function_loss(model, probe, {0: units}, method="shuffle", scale=4.0)
    hook.remove()
    clean, shuffled = seen
    assert float(shuffled[:, :, units].mean()) == pytest.approx(4 * float(clean[:, :, units].mean()),
                                                              rel=1e-5)
    assert float(shuffled[:, :, units].var()) == pytest.approx(16 * float(clean[:, :, units].var()),
                                                             rel=1e-5)
    rest = np.setdiff1d(np.arange(32), units)
    assert torch.equal(shuffled[:, :, rest], clean[:, :, rest])
    assert perturbation_layers(12) == [8, 9, 10, 11]  # T5-base: encoder layers 8-11
    assert perturbation_layers(2) == [1] and perturbation_layers(1) == [0]


def test_bad_input_is_a_named_error():
    with pytest.raises(UserError, match="one class only"):
        ProbingSet("all-ones", [[1, 2], [3, 4]], np.array([1, 1]))
    model, probe = planted_model(), planted_probe(16)
    pred = predictivity(collect_activations(model, probe)[0], probe.labels)
    test = find_functional_experts(pred, np.repeat(np.arange(4), 8), share=0.25)
    with pytest.raises(UserError, match="k 5 must be between 1 and the 4 experts"):
        expert_units({0: test}, {0: np.repeat(np.arange(4), 8)}, k=5)
    with pytest.raises(UserError, match="do not split into 64 equal experts"):
        moefication_partitions(model, num_experts=64)
    swiglu = GPT(ModelConfig(vocab_size=16, block_size=16, n_layer=1, n_head=1, n_embd=16,
                             activation="swiglu"))
    with pytest.raises(UserError, match="activation 'swiglu' is not supported"):
        collect_activations(swiglu, probe)
    with pytest.raises(UserError, match="has no answers"):
        function_loss(model, ProbingSet("x", probe.tokens, probe.labels))
    with pytest.raises(UserError, match="perturbation 'noise': expected one of shuffle, permute"):
        function_loss(model, probe, {0: np.arange(4)}, method="noise")


def test_native_moe_experts_are_read_and_perturbed_like_the_dense_ffn_they_came_from():
    """A MoEfied layer with every expert active equals its dense FFN: its expert neurons (through
    Experts.activation_point and the routing plan) are the dense neurons in the permuted order,
    and perturbing the same neurons gives the same loss."""
    dense, probe = planted_model(), planted_probe()
    moe_model = planted_model()
    moe_model.blocks[0].ffn = moefy_ffn(moe_model.blocks[0].ffn, num_experts=4, top_k=4)
    perm = moe_model.blocks[0].ffn.unit_permutation.numpy()
    dense_acts = collect_activations(dense, probe)[0]
    moe_acts = collect_activations(moe_model, probe)[0]
    np.testing.assert_allclose(moe_acts, dense_acts[:, perm], atol=1e-5)
    assert moefication_partitions(moe_model)[0].tolist() == np.repeat(np.arange(4), 8).tolist()
    units = np.arange(8, 16)  # dense ids of the planted expert
    moe_units = np.flatnonzero(np.isin(perm, units))
    assert function_loss(moe_model, probe, {0: moe_units}) == pytest.approx(
        function_loss(dense, probe, {0: units}), abs=1e-5)
    # top-1 routing: a neuron of an expert a token did not reach reads 0 for that token
    routed = planted_model()
    routed.blocks[0].ffn = moefy_ffn(routed.blocks[0].ffn, num_experts=4, top_k=1)
    routed_acts = collect_activations(routed, probe)[0]
    perm = routed.blocks[0].ffn.unit_permutation.numpy()
    assert (routed_acts <= dense_acts[:, perm] + 1e-6).all()
    assert (routed_acts < dense_acts[:, perm] - 1e-3).any()


# --- the evidence script at a tiny size ------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("modularity_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_tiny_trains_keeps_checkpoints_and_reports_all_three_tables(tmp_path, capsys):
    script = load_script()
    results = script.main(["--tiny", "true", "--out-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    for heading in ("(0) the model", "(1) functional experts", "(2a) perturbation: official shuffle",
                    "(2b) perturbation: permutation", "(3) emergence"):
        assert heading in printed
    checkpoints = sorted((tmp_path / "run").glob("ckpt_*.pt"))
    assert len(checkpoints) == 3  # every ckpt_interval, none deleted
    assert [(r["from"], r["to"]) for r in results["emergence"]] == [(10, 20), (20, 30)]
    for row in results["emergence"]:
        for level in ("neuron", "expert_final", "expert_matched", "random"):
            assert -1 <= row[level] <= 1
            assert row[level] == pytest.approx(np.mean([v[level] for v in row["by_function"].values()]))
    assert set(results["answer_loss"]) == {"size", "parity", "mood", "colour"}
    for method in ("shuffle", "permute"):
        assert results["perturbation"][method]["layers"] == [1]  # the last third of 2 layers
    assert 0 <= results["functional"]["random"]["functional_share"] <= 1
    saved = json.loads((tmp_path / "results.json").read_text())  # strict JSON: nan is null
    assert saved["functional"]["clusters"]["pairs"] == results["functional"]["clusters"]["pairs"]

    # the same script on that checkpoint with a probing file; a one-class function is refused
    probing = tmp_path / "probes.jsonl"
    rows = [{"function": "size", "text": f"the {w} is a", "label": label, "answer": a}
            for label, (words, a) in enumerate(zip(script.WORDS["size"][::-1], (" small", " big")))
            for w in words]
    probing.write_text("\n".join(json.dumps(r) for r in rows))
    again = script.main(["--checkpoint", str(checkpoints[-1]), "--probing", str(probing),
                         "--out-dir", str(tmp_path / "again"), "--experts", "4"])
    assert set(again["answer_loss"]) == {"size"} and "emergence" not in again
    # a Hugging Face GPT-2 folder with GELU (the tiny model's weights under another activation)
    model, tok, _ = load_model(checkpoints[-1])
    gelu = GPT(dataclasses.replace(model.config, activation="gelu_tanh"))
    gelu.load_state_dict(model.state_dict())
    save_hf(gelu, tmp_path / "hf")
    save_hf_tokenizer(tok, tmp_path / "hf")
    hf = script.main(["--hf", str(tmp_path / "hf"), "--probing", str(probing),
                      "--out-dir", str(tmp_path / "hf_out"), "--experts", "4"])
    assert hf["functional"]["clusters"]["pairs"] == 2 * 4  # 2 layers x 4 experts x 1 function
    # the documented way for a pretrained GPT-2: --hf FOLDER alone probes the planted functions
    planted = script.main(["--hf", str(tmp_path / "hf"), "--examples", "16", "--experts", "4",
                           "--out-dir", str(tmp_path / "hf_planted")])
    assert set(planted["answer_loss"]) == {"size", "parity", "mood", "colour"}
    assert planted["functional"]["clusters"]["pairs"] == 2 * 4 * 4 and "emergence" not in planted
    probing.write_text("\n".join(json.dumps({**r, "label": 1}) for r in rows))
    with pytest.raises(UserError, match="one class only"):
        script.main(["--checkpoint", str(checkpoints[-1]), "--probing", str(probing),
                     "--out-dir", str(tmp_path / "bad")])


@pytest.mark.parametrize("flags,message", [
    (["--perturbation", "noise"], "--perturbation 'noise': expected one of shuffle, permute, both"),
    (["--perturb-layers", "first"], "--perturb-layers 'first': expected one of last-third, all"),
    (["--threads", "-1"], "--threads -1: expected 0"),
    (["--var", "0"], "--var 0.0: the shuffle's scale must be positive"),
])
def test_script_flags_are_checked_before_any_work(tmp_path, flags, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        load_script().main(flags + ["--out-dir", str(tmp_path)])
