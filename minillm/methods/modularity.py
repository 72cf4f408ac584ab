"""Emergent modularity (Zhang et al. 2023, "Emergent Modularity in Pre-trained Transformers").

Does a trained Transformer's FFN hold *functional experts*: groups of neurons that specialise in
one function, and whose perturbation hurts that function more than others? In five steps:

1. Activations: for every example of a labelled probing set, each FFN neuron's activation, max over
   the example's prompt tokens, per layer. Collected by forward hooks on `DenseFFN.activation_point`
   (or a native MoE's `Experts.activation_point`), one batch at a time: memory is N x units per
   layer plus one batch, never tokens x units for the whole set.
2. Predictivity of a neuron for a binary sub-function: max(AP(y), AP(1 - y)), AP the average
   precision of the activations as scores (ties handled as in scikit-learn).
3. Experts: a partition of each layer's neurons, from MoEfication clusters (`moefy.balanced_kmeans`
   on W_in rows) or a native MoE's experts. For each sub-function take the top `share` of a layer's
   neurons by predictivity (N of M), count them per expert (n neurons); the expert is *functional*
   when the one-sided hypergeometric tail P(X >= count) <= `alpha`. Reported: the share of
   (expert, sub-function) pairs that are functional, and the *modularisation extent*, count /
   expected count, averaged over the functional pairs and, as the official code does, per
   (layer, sub-function) with 0 where none is functional; beside the same for random partitions
   of the same sizes.
4. Perturbation, as in the official code (thunlp/Modularity-Analysis, Perturbation4T5/
   glue_inf.py): in the last third of the layers (T5-base's encoder layers 8-11 of 12), the
   chosen neurons' activations over a batch (B x T x n values) are shuffled as one flat list,
   across examples, positions and neurons, and multiplied by var = 4; the mean is not kept (it
   becomes 4 times the pool's, the variance 16 times). We shuffle the real tokens only (the
   official pool includes padding). Option "permute": each chosen neuron takes its own
   activation from another example of the batch, position by position (keeps every neuron's
   distribution; our earlier default). Measured: each function's loss on its answer tokens.
   Chosen neurons: a function's functional experts, the same number of its top-predictivity
   neurons per layer, or random ones.
5. Emergence (Stabilization/ExpertAndNeuron_Stabilization.py): Spearman correlation between
   adjacent checkpoints of neuron-level and of expert-level predictivity (an expert's is the
   mean of its neurons'), one per (layer, sub-function), averaged over layers per sub-function
   and then over sub-functions; beside random partitions of the same sizes (the official
   baseline). Partitions: the final checkpoint's clusters for all (official), or each
   checkpoint's own clusters matched to the next one's by an optimal assignment (Hungarian
   algorithm on neuron overlap).

Knobs (defaults): share 0.1 of a layer's neurons (the paper's 1% has no power at a few hundred
neurons), alpha 0.001 (the paper's), 16 experts per layer (the paper's MoEfication), k 1 functional
expert per layer perturbed, var 4 (the official perturbation's). Activations supported: ReLU and
GELU (a SwiGLU unit is a signed product whose max is not an activation level; the analysis refuses
it by name).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..model import GPT, DenseFFN
from ..moe import MoE
from ..moefy import balanced_kmeans

SUPPORTED_ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


# --- probing sets -----------------------------------------------------------------------------------

@dataclass
class ProbingSet:
    """One binary sub-function. `tokens[i]` is example i's token ids, `labels[i]` its label (0 / 1)
    and `answer_start[i]` (optional) where its answer begins: activations are read over the prompt
    `tokens[i][:answer_start[i]]` only (the answer would give the label away), and the function's
    performance is the loss on the answer tokens. Without answers, the whole example is the prompt
    and the set cannot be used for perturbation."""
    name: str
    tokens: list[list[int]]
    labels: np.ndarray
    answer_start: list[int] | None = None

    def __post_init__(self):
        self.labels = np.asarray(self.labels)
        if len(self.tokens) != len(self.labels):
            raise UserError(f"probing set {self.name!r}: {len(self.tokens)} examples but "
                            f"{len(self.labels)} labels")
        if not np.isin(self.labels, (0, 1)).all():
            raise UserError(f"probing set {self.name!r}: labels must be 0 or 1")
        present = np.unique(self.labels)
        if len(present) < 2:
            raise UserError(f"probing set {self.name!r} has one class only (every label is "
                            f"{int(present[0]) if len(present) else 'missing'}): predictivity needs "
                            "examples of both classes")
        if self.answer_start is not None:
            for i, (toks, start) in enumerate(zip(self.tokens, self.answer_start)):
                if not 1 <= start < len(toks):
                    raise UserError(f"probing set {self.name!r}, example {i}: answer_start {start} "
                                    f"must leave a prompt and an answer in its {len(toks)} tokens")
        elif any(len(t) == 0 for t in self.tokens):
            raise UserError(f"probing set {self.name!r} has an empty example")

    def prompt_lengths(self) -> list[int]:
        return list(self.answer_start) if self.answer_start is not None else [len(t) for t in self.tokens]


# --- hooks: every analysed layer seen as (B, T, units) --------------------------------------------

def ffn_layers(model: GPT) -> dict[int, int]:
    """{layer: neurons} of every FFN the analysis can read; a named error for an unsupported
    activation or an MoE without an expert activation point."""
    layers = {}
    for i, block in enumerate(model.blocks):
        ffn = block.ffn
        if isinstance(ffn, DenseFFN):
            act, units = ffn.activation, ffn.up.out_features
        elif isinstance(ffn, MoE):
            if not hasattr(ffn.experts, "activation_point"):
                raise UserError(f"layer {i}: this MoE's Experts module has no activation_point "
                                "to hook")
            act, units = ffn.cfg.activation, ffn.cfg.num_experts * ffn.cfg.expert_hidden
        else:
            raise UserError(f"layer {i}: a {type(ffn).__name__} FFN; the analysis reads DenseFFN "
                            "and MoE layers")
        if act not in SUPPORTED_ACTIVATIONS:
            raise UserError(f"layer {i}: activation {act!r} is not supported by the modularity "
                            f"analysis (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        layers[i] = units
    return layers


def native_partition(model: GPT, layer: int) -> np.ndarray | None:
    """Expert of every neuron of a native MoE layer (neurons numbered expert-major), else None."""
    ffn = model.blocks[layer].ffn
    if not isinstance(ffn, MoE):
        return None
    return np.repeat(np.arange(ffn.cfg.num_experts), ffn.cfg.expert_hidden)


@contextlib.contextmanager
def activation_hooks(model: GPT, fn, layers=None):
    """Call `fn(layer, h_BTU)` on every analysed layer's activations during forward passes; a
    tensor it returns replaces them. A native MoE's (E, C, F) expert buffer is shown as (B, T,
    E * F), zero where a token was not routed to an expert, and a replacement is written back to
    the routed entries only."""
    handles = []
    wanted = ffn_layers(model) if layers is None else {i: None for i in layers}
    for i in wanted:
        ffn = model.blocks[i].ffn
        if isinstance(ffn, DenseFFN):
            handles.append(ffn.activation_point.register_forward_hook(
                lambda mod, inp, out, i=i: fn(i, out)))
            continue
        seen = {}  # the MoE's input shape and the router's plan of the current forward pass

        def remember_shape(mod, args, seen=seen):
            seen["BT"] = args[0].shape[:2]

        def remember_plan(mod, inp, plan, seen=seen):
            seen["plan"] = plan

        def on_experts(mod, inp, h_ECF, i=i, seen=seen):
            plan, (B, T) = seen["plan"], seen["BT"]
            E, _, Fe = h_ECF.shape
            kept = plan.kept
            tok, exp, slot = plan.token[kept], plan.expert[kept], plan.slot[kept]
            h_TEF = h_ECF.new_zeros(B * T, E, Fe)
            h_TEF[tok, exp] = h_ECF[exp, slot]
            new = fn(i, h_TEF.view(B, T, E * Fe))
            if new is None:
                return None
            out_ECF = h_ECF.clone()
            out_ECF[exp, slot] = new.reshape(B * T, E, Fe)[tok, exp]
            return out_ECF

        handles += [ffn.register_forward_pre_hook(remember_shape),
                    ffn.router.register_forward_hook(remember_plan),
                    ffn.experts.activation_point.register_forward_hook(on_experts)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _batches(probe: ProbingSet, batch_size: int, with_answers: bool):
    """(start, idx_BT, valid_BT) over the set, right-padded; valid marks prompt tokens."""
    lengths = probe.prompt_lengths()
    for start in range(0, len(probe.tokens), batch_size):
        rows = probe.tokens[start:start + batch_size]
        if not with_answers:
            rows = [r[:n] for r, n in zip(rows, lengths[start:start + batch_size])]
        T = max(len(r) for r in rows)
        idx = torch.zeros(len(rows), T, dtype=torch.long)
        valid = torch.zeros(len(rows), T, dtype=torch.bool)
        for b, (r, n) in enumerate(zip(rows, lengths[start:start + batch_size])):
            idx[b, :len(r)] = torch.tensor(r)
            valid[b, :n] = True
        yield start, idx, valid


@torch.no_grad()
def collect_activations(model: GPT, probe: ProbingSet, batch_size: int = 64) -> dict[int, np.ndarray]:
    """{layer: (N, units) float32}: each neuron's max activation over each example's prompt."""
    units = ffn_layers(model)
    device = next(model.parameters()).device
    out = {i: np.empty((len(probe.tokens), u), np.float32) for i, u in units.items()}
    model.eval()
    for start, idx, valid in _batches(probe, batch_size, with_answers=False):
        mask_BT1 = valid.to(device)[..., None]

        def observe(layer, h_BTU):
            h_max = h_BTU.float().masked_fill(~mask_BT1, float("-inf")).amax(1)
            out[layer][start:start + len(idx)] = h_max.cpu().numpy()

        with activation_hooks(model, observe):
            model(idx.to(device))
    return out


# --- predictivity -----------------------------------------------------------------------------------

def average_precision(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Average precision of every column of `scores` (N, U) (or a vector) for labels y (N,) in
    {0, 1}: the mean, over positives, of the precision at the threshold equal to their score (tied
    scores share one threshold, as in scikit-learn's `average_precision_score`)."""
    s = np.asarray(scores, dtype=np.float64)
    vector = s.ndim == 1
    s = s[:, None] if vector else s
    y = np.asarray(y).astype(np.float64)
    N = len(y)
    positives = y.sum()
    if positives == 0:
        raise UserError("average precision needs at least one positive example")
    order = np.argsort(-s, axis=0, kind="stable")
    s_sorted = np.take_along_axis(s, order, axis=0)
    y_sorted = y[order]
    tp = np.cumsum(y_sorted, axis=0)
    precision = tp / np.arange(1, N + 1)[:, None]
    # each position's threshold is the last position of its tie group
    group_end = np.vstack([s_sorted[1:] != s_sorted[:-1], np.ones((1, s.shape[1]), bool)])
    end_index = np.where(group_end, np.arange(N)[:, None], N)
    end_index = np.minimum.accumulate(end_index[::-1], axis=0)[::-1]
    ap = (y_sorted * np.take_along_axis(precision, end_index, axis=0)).sum(0) / positives
    return ap[0] if vector else ap


def predictivity(acts_NU: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """max(AP(y), AP(1 - y)) per neuron (U,): high when the neuron's activation separates the
    classes in either direction."""
    y = np.asarray(labels)
    return np.maximum(average_precision(acts_NU, y), average_precision(acts_NU, 1 - y))


def separation(acts_NU: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """|mean(class 1) - mean(class 0)| / pooled standard deviation per neuron (U,): breaks the ties
    of predictivity, which saturates at 1 for every neuron that separates the classes perfectly
    (common on easy planted functions), so that the top share is not chosen by neuron index."""
    a = np.asarray(acts_NU, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    a1, a0 = a[y], a[~y]
    pooled = np.sqrt((a1.var(0) * len(a1) + a0.var(0) * len(a0)) / len(a))
    return np.abs(a1.mean(0) - a0.mean(0)) / np.maximum(pooled, 1e-12)


def rank_neurons(pred_U: np.ndarray, tiebreak_U: np.ndarray | None = None) -> np.ndarray:
    """Neuron ids, most predictive first; equal predictivity ordered by `tiebreak_U` (larger
    first), then by id."""
    if tiebreak_U is None:
        return np.argsort(-pred_U, kind="stable")
    return np.lexsort((-np.asarray(tiebreak_U), -np.asarray(pred_U)))


# --- functional experts -----------------------------------------------------------------------------

def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def hypergeom_sf(k: int, M: int, n: int, N: int) -> float:
    """P(X >= k) for X ~ Hypergeometric(M population, n successes in it, N drawn): the chance that
    an expert of n neurons out of M holds k or more of N selected neurons by luck. Terms from
    log-gamma (exact binomials overflow floats at real sizes), summed in log space."""
    if not (0 <= n <= M and 0 <= N <= M):
        raise ValueError(f"hypergeometric: need 0 <= n, N <= M, got M={M} n={n} N={N}")
    lo, hi = max(k, 0, N - (M - n)), min(n, N)
    if lo > hi:
        return 0.0 if k > hi else 1.0
    logs = [_log_comb(n, x) + _log_comb(M - n, N - x) - _log_comb(M, N) for x in range(lo, hi + 1)]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(v - top) for v in logs))


@dataclass
class ExpertTest:
    """One layer, one sub-function: per expert its count among the selected neurons, the count
    expected by chance, the tail p-value and whether it is functional."""
    counts: np.ndarray
    expected: np.ndarray
    pvalues: np.ndarray
    functional: np.ndarray


def find_functional_experts(pred_U: np.ndarray, partition_U: np.ndarray, share: float = 0.1,
                            alpha: float = 1e-3, tiebreak_U: np.ndarray | None = None) -> ExpertTest:
    """Select the top `share` of neurons by predictivity (ties by `tiebreak_U`, see
    `rank_neurons`) and test every expert of `partition_U` (the expert id of each neuron) with the
    one-sided hypergeometric tail."""
    if not 0 < share <= 1:
        raise UserError(f"share must be in (0, 1], got {share}")
    M = len(pred_U)
    selected_count = max(1, int(round(share * M)))
    selected = rank_neurons(pred_U, tiebreak_U)[:selected_count]
    E = int(partition_U.max()) + 1
    sizes = np.bincount(partition_U, minlength=E)
    counts = np.bincount(partition_U[selected], minlength=E)
    p = np.array([hypergeom_sf(int(c), M, int(n), selected_count) for c, n in zip(counts, sizes)])
    return ExpertTest(counts, selected_count * sizes / M, p, p <= alpha)


def random_partition(partition_U: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random partition with the same expert sizes."""
    return rng.permutation(partition_U)


def modularity_summary(preds: dict[int, dict[str, np.ndarray]], partitions: dict[int, np.ndarray],
                       share: float = 0.1, alpha: float = 1e-3, tiebreaks=None) -> dict:
    """Over layers and sub-functions: the share of (expert, sub-function) pairs that are functional
    and the modularisation extent, count / expected count, two ways: `extent`, the mean over the
    functional pairs (nan when there are none), and `extent_official`, the official code's: per
    (layer, sub-function) the mean over its functional experts, 0 when it has none, then the mean
    over (layer, sub-function). `preds[layer][function]` is the predictivity of the layer's
    neurons, `tiebreaks` (optional) the same structure for `rank_neurons`."""
    functional, ratios, total, per_pair = 0, [], 0, []
    for layer, per_function in preds.items():
        for function, pred in per_function.items():
            tiebreak = tiebreaks[layer][function] if tiebreaks is not None else None
            t = find_functional_experts(pred, partitions[layer], share, alpha, tiebreak)
            functional += int(t.functional.sum())
            total += len(t.functional)
            pair_ratios = list(t.counts[t.functional] / t.expected[t.functional])
            ratios += pair_ratios
            per_pair.append(float(np.mean(pair_ratios)) if pair_ratios else 0.0)
    return {"functional_share": functional / total, "functional": functional, "pairs": total,
            "extent": float(np.mean(ratios)) if ratios else float("nan"),
            "extent_official": float(np.mean(per_pair))}


def random_baseline(preds, partitions, share=0.1, alpha=1e-3, repeats=20, seed=0,
                    tiebreaks=None) -> dict:
    """`modularity_summary` averaged over `repeats` random partitions of the same sizes."""
    rng = np.random.default_rng(seed)
    runs = [modularity_summary(preds, {l: random_partition(p, rng) for l, p in partitions.items()},
                               share, alpha, tiebreaks) for _ in range(repeats)]
    extents = [r["extent"] for r in runs if not math.isnan(r["extent"])]
    return {"functional_share": float(np.mean([r["functional_share"] for r in runs])),
            "extent": float(np.mean(extents)) if extents else float("nan"),
            "extent_official": float(np.mean([r["extent_official"] for r in runs])),
            "repeats": repeats}


def moefication_partitions(model: GPT, num_experts: int = 16, seed: int = 0) -> dict[int, np.ndarray]:
    """{layer: expert of each neuron}: a native MoE's experts, or MoEfication's balanced k-means
    clusters of a dense FFN's W_in rows."""
    parts = {}
    for layer, units in ffn_layers(model).items():
        native = native_partition(model, layer)
        if native is not None:
            parts[layer] = native
            continue
        if not 1 <= num_experts <= units or units % num_experts:
            raise UserError(f"layer {layer}: {units} neurons do not split into {num_experts} "
                            "equal experts")
        w_in = model.blocks[layer].ffn.up.weight.detach().cpu()
        parts[layer] = balanced_kmeans(w_in, num_experts, seed=seed).numpy()
    return parts


# --- perturbation -----------------------------------------------------------------------------------

def expert_units(tests: dict[int, ExpertTest], partitions: dict[int, np.ndarray],
                 k: int = 1) -> dict[int, np.ndarray]:
    """{layer: neurons} of the (up to) k most significant functional experts of each layer."""
    units = {}
    for layer, t in tests.items():
        E = len(t.functional)
        if not 1 <= k <= E:
            raise UserError(f"k {k} must be between 1 and the {E} experts of layer {layer}")
        ranked = [e for e in np.argsort(t.pvalues, kind="stable")[:k] if t.functional[e]]
        units[layer] = np.flatnonzero(np.isin(partitions[layer], ranked))
    return units


def top_units(preds: dict[int, np.ndarray], counts: dict[int, int],
              tiebreaks: dict[int, np.ndarray] | None = None) -> dict[int, np.ndarray]:
    """The `counts[layer]` most predictive neurons of each layer (ties as in `rank_neurons`)."""
    return {l: rank_neurons(preds[l], tiebreaks[l] if tiebreaks else None)[:counts[l]] for l in counts}


def random_units(sizes: dict[int, int], counts: dict[int, int], rng) -> dict[int, np.ndarray]:
    """`counts[layer]` neurons drawn at random from each layer's `sizes[layer]`."""
    return {l: rng.choice(sizes[l], counts[l], replace=False) for l in counts}


PERTURBATIONS = ("shuffle", "permute")


def perturbation_layers(n_layer: int) -> list[int]:
    """The layers the official code perturbs: the last third (T5-base's encoder layers 8-11 of
    12); at least the last layer."""
    return list(range(min((2 * n_layer) // 3, n_layer - 1), n_layer))


def shuffle_units(h_BTU: torch.Tensor, units: torch.Tensor, valid_BT: torch.Tensor, scale: float,
                  generator: torch.Generator) -> torch.Tensor:
    """The official perturbation: the chosen units' activations at the batch's real tokens, a pool
    of V positions x n units, are shuffled as one flat list (across examples, positions *and*
    units) and multiplied by `scale`. The pool's values are kept as a multiset, so the perturbed
    activations have `scale` times its mean and `scale`^2 times its variance: the mean is not kept.
    Other units and padding positions are unchanged."""
    out = h_BTU.clone()
    rows_VU = out[valid_BT]
    pool_Vn = rows_VU[:, units]
    order = torch.randperm(pool_Vn.numel(), generator=generator).to(h_BTU.device)
    rows_VU[:, units] = pool_Vn.reshape(-1)[order].view_as(pool_Vn) * scale
    out[valid_BT] = rows_VU
    return out


def permute_units(h_BTU: torch.Tensor, units: torch.Tensor, perm_B: torch.Tensor) -> torch.Tensor:
    """Our earlier perturbation (an option): each chosen unit takes, position by position, its own
    activation from another example of the batch (`perm_B`): every unit keeps its distribution."""
    out = h_BTU.clone()
    out[:, :, units] = h_BTU[perm_B][:, :, units]
    return out


@torch.no_grad()
def function_loss(model: GPT, probe: ProbingSet, perturb: dict[int, np.ndarray] | None = None,
                  batch_size: int = 256, seed: int = 0, method: str = "shuffle",
                  scale: float = 4.0) -> float:
    """Mean cross-entropy on the answer tokens of `probe`, with the activations of the neurons in
    `perturb` ({layer: neuron ids}) perturbed batch by batch: `method` "shuffle" is the official
    `shuffle_units` (with `scale`, the official var = 4), "permute" is `permute_units` over the
    batch's examples (use batches that hold many examples). Which layers to perturb is the
    caller's choice (the official code: `perturbation_layers`)."""
    if probe.answer_start is None:
        raise UserError(f"probing set {probe.name!r} has no answers: its loss cannot be measured")
    if method not in PERTURBATIONS:
        raise UserError(f"perturbation {method!r}: expected one of {', '.join(PERTURBATIONS)}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    model.eval()
    for start, idx, _ in _batches(probe, batch_size, with_answers=True):
        B, T = idx.shape
        lengths = torch.tensor([len(t) for t in probe.tokens[start:start + B]])
        real_BT = (torch.arange(T)[None, :] < lengths[:, None]).to(device)
        perm = torch.randperm(B, generator=g).to(device)
        chosen = {l: torch.as_tensor(u, dtype=torch.long, device=device)
                  for l, u in (perturb or {}).items() if len(u)}

        def perturbed(layer, h_BTU):
            if layer not in chosen:
                return None
            if method == "shuffle":
                return shuffle_units(h_BTU, chosen[layer], real_BT, scale, g)
            return permute_units(h_BTU, chosen[layer], perm)

        targets = torch.full((B, T), -100, dtype=torch.long)
        for b in range(B):
            toks, a = probe.tokens[start + b], probe.answer_start[start + b]
            targets[b, a - 1:len(toks) - 1] = torch.tensor(toks[a:])
        with activation_hooks(model, perturbed) if chosen else contextlib.nullcontext():
            logits = model(idx.to(device)).logits.float()
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.to(device).view(-1),
                               ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((targets != -100).sum())
    return total / count


# --- emergence ----------------------------------------------------------------------------------------

def rankdata(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties given their mean rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson correlation of tie-averaged ranks)."""
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom else float("nan")


def min_cost_assignment(cost: np.ndarray) -> np.ndarray:
    """col[i] assigned to row i minimising the total cost of a square matrix (the Hungarian
    algorithm with potentials, O(n^3))."""
    n = len(cost)
    INF = float("inf")
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=int)  # match[col] = row, 1-based; 0: free
    for row in range(1, n + 1):
        match[0], col0 = row, 0
        best = np.full(n + 1, INF)
        prev = np.zeros(n + 1, dtype=int)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            r = match[col0]
            delta, col1 = INF, 0
            for c in range(1, n + 1):
                if not used[c]:
                    reduced = cost[r - 1, c - 1] - u[r] - v[c]
                    if reduced < best[c]:
                        best[c], prev[c] = reduced, col0
                    if best[c] < delta:
                        delta, col1 = best[c], c
            for c in range(n + 1):
                if used[c]:
                    u[match[c]] += delta
                    v[c] -= delta
                else:
                    best[c] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:  # flip the augmenting path
            col1 = prev[col0]
            match[col0] = match[col1]
            col0 = col1
    assignment = np.zeros(n, dtype=int)
    for c in range(1, n + 1):
        assignment[match[c] - 1] = c - 1
    return assignment


def match_partition(partition: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """`partition` relabelled so that each expert takes the label of the `reference` expert it
    shares the most neurons with (one-to-one, maximum total overlap)."""
    E = int(max(partition.max(), reference.max())) + 1
    overlap = np.zeros((E, E))
    np.add.at(overlap, (partition, reference), 1)
    to_reference = min_cost_assignment(-overlap)
    return to_reference[partition]


def expert_predictivity(pred_U: np.ndarray, partition_U: np.ndarray) -> np.ndarray:
    """Each expert's predictivity: the mean of its neurons'."""
    E = int(partition_U.max()) + 1
    return np.bincount(partition_U, weights=pred_U, minlength=E) / np.bincount(partition_U, minlength=E)


def emergence(preds: list[dict[int, dict[str, np.ndarray]]],
              partitions: list[dict[int, np.ndarray]], random_repeats: int = 20,
              seed: int = 0) -> list[dict]:
    """For each pair of adjacent checkpoints, the official stabilisation score: a Spearman
    correlation per (layer, sub-function) between the two checkpoints' predictivities, averaged
    over layers for each sub-function (`by_function`) and over sub-functions and layers (the
    headline numbers). Levels: `neuron`; `expert_final`, experts under the final checkpoint's
    clusters applied to every checkpoint (the official choice); `expert_matched`, each
    checkpoint's own clusters, the earlier ones matched to the later ones by assignment;
    `random`, experts under random partitions of the same sizes (one partition per repeat and
    layer, shared by all checkpoints, as in the official baseline), averaged over
    `random_repeats`."""
    final = partitions[-1]
    rng = np.random.default_rng(seed)
    randoms = [{l: random_partition(p, rng) for l, p in final.items()} for _ in range(random_repeats)]
    layers = sorted(preds[0])
    functions = sorted(preds[0][layers[0]])

    def score(a, b, level, parts_a=None, parts_b=None):
        per_function = {}
        for f in functions:
            per_layer = []
            for l in layers:
                x, y = preds[a][l][f], preds[b][l][f]
                if level != "neuron":
                    x, y = expert_predictivity(x, parts_a[l]), expert_predictivity(y, parts_b[l])
                per_layer.append(spearman(x, y))
            per_function[f] = float(np.mean(per_layer))
        return per_function

    rows = []
    for a in range(len(preds) - 1):
        b = a + 1
        matched = {l: match_partition(partitions[a][l], partitions[b][l]) for l in partitions[a]}
        levels = {"neuron": score(a, b, "neuron"),
                  "expert_final": score(a, b, "expert", final, final),
                  "expert_matched": score(a, b, "expert", matched, partitions[b])}
        if random_repeats:
            draws = [score(a, b, "expert", r, r) for r in randoms]
            levels["random"] = {f: float(np.mean([d[f] for d in draws])) for f in functions}
        row = {level: float(np.mean(list(v.values()))) for level, v in levels.items()}
        row["by_function"] = {f: {level: v[f] for level, v in levels.items()} for f in functions}
        rows.append(row)
    return rows


__all__ = ["ProbingSet", "SUPPORTED_ACTIVATIONS", "ffn_layers", "native_partition",
           "activation_hooks", "collect_activations", "average_precision", "predictivity",
           "separation", "rank_neurons",
           "hypergeom_sf", "ExpertTest", "find_functional_experts", "random_partition",
           "modularity_summary",
           "random_baseline", "moefication_partitions", "expert_units", "top_units", "random_units",
           "PERTURBATIONS", "perturbation_layers", "shuffle_units", "permute_units",
           "function_loss", "rankdata", "spearman", "min_cost_assignment", "match_partition",
           "expert_predictivity", "emergence"]
