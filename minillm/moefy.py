"""MoEfication (Zhang et al. 2022): split a dense FFN into experts, and merge them back.

A dense FFN's hidden units are partitioned into E equal groups by **balanced k-means on the
L2-normalised rows of W_in** (units that respond to similar inputs land together). Expert e holds
its group's rows of W_in (and of W_gate for SwiGLU) and columns of W_out. This is a permutation of
the hidden units, so the MoE with every expert active and unweighted equals the dense FFN, and
merging the experts back restores the dense weights exactly (the permutation is stored).

The router is initialised from the clusters: expert e's score is x . c_e, with c_e the mean of its
normalised rows rescaled to the mean norm of a W_in row. Used by SSD (switchable sparse-dense
training) and the emergent-modularity analysis, hence a primitive of its own.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .model import DenseFFN, ModelConfig
from .moe import MoE, MoEConfig


def balanced_kmeans(points_ND: torch.Tensor, k: int, iters: int = 20, seed: int = 0,
                    init_labels: torch.Tensor | None = None) -> torch.Tensor:
    """Cluster labels (N,) with exactly N / k points per cluster, by cosine similarity.

    Each round assigns greedily: points in order of how strongly they prefer their best cluster
    (largest margin first) take their best cluster that still has room; centroids are then the
    normalised means. Starts from random points (deterministic for a seed), or from the centroids
    of `init_labels` (a warm start from an earlier clustering)."""
    N = len(points_ND)
    if N % k:
        raise ValueError(f"{N} points do not split into {k} equal clusters")
    size = N // k
    x = nn.functional.normalize(points_ND.float(), dim=-1)
    if init_labels is not None:
        centroids_KD = _centroids(x, init_labels, k)
        labels = init_labels.clone()
    else:
        g = torch.Generator().manual_seed(seed)
        centroids_KD = x[torch.randperm(N, generator=g)[:k]]
        labels = torch.full((N,), -1, dtype=torch.long)
    for _ in range(iters):
        scores_NK = x @ centroids_KD.t()
        top2 = scores_NK.topk(min(2, k), dim=-1).values
        margin = top2[:, 0] - (top2[:, 1] if k > 1 else 0)
        room = [size] * k
        new = torch.empty(N, dtype=torch.long)
        preference = torch.argsort(scores_NK, dim=1, descending=True, stable=True).tolist()
        for i in torch.argsort(margin, descending=True, stable=True).tolist():
            for c in preference[i]:
                if room[c] > 0:
                    new[i] = c
                    room[c] -= 1
                    break
        if torch.equal(new, labels):
            break
        labels = new
        centroids_KD = _centroids(x, labels, k)
    return labels


def _centroids(x_ND: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Normalised mean of each cluster's (normalised) points, (k, D)."""
    sums_KD = torch.zeros(k, x_ND.shape[1], dtype=x_ND.dtype).index_add_(0, labels, x_ND)
    return nn.functional.normalize(sums_KD, dim=-1)


def clustering_score(points_ND: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """The balanced k-means objective: mean cosine similarity of each point to its cluster's
    centroid (higher is better). Used to keep the better of a warm-started and a fresh clustering."""
    x = nn.functional.normalize(points_ND.float(), dim=-1)
    return float((x * _centroids(x, labels, k)[labels]).sum(-1).mean())


# --- the unit permutation, applied to any tensors laid out like the FFN's weights ------------------
# A dense FFN's per-parameter tensors (weights, and equally AdamW's moments) map to the MoE's by
# the same permutation and reshape; the trainer uses these to carry optimizer state across a switch.

def dense_to_experts(tensors: dict, perm: torch.Tensor, num_experts: int) -> dict:
    """{DenseFFN parameter name: tensor} -> {MoE parameter name: tensor}, units grouped by expert
    in the order `perm` (units of expert e are perm[e * F/E : (e + 1) * F/E])."""
    F_, d = tensors["up.weight"].shape
    E, per = num_experts, F_ // num_experts
    out = {"experts.w_up": tensors["up.weight"][perm].reshape(E, per, d).transpose(1, 2).contiguous(),
           "experts.w_down": tensors["down.weight"][:, perm].t().reshape(E, per, d).contiguous()}
    if "gate.weight" in tensors:
        out["experts.w_gate"] = (tensors["gate.weight"][perm].reshape(E, per, d).transpose(1, 2)
                                 .contiguous())
    if "up.bias" in tensors:
        out["experts.b_up"] = tensors["up.bias"][perm].reshape(E, 1, per).clone()
    if "gate.bias" in tensors:
        out["experts.b_gate"] = tensors["gate.bias"][perm].reshape(E, 1, per).clone()
    if "down.bias" in tensors:  # added once per token, not once per expert
        out["output_bias"] = tensors["down.bias"].clone()
    return out


def experts_to_dense(tensors: dict, perm: torch.Tensor) -> dict:
    """The inverse of `dense_to_experts`: {MoE parameter name: tensor} -> {DenseFFN name: tensor}
    in the original unit order. A missing output bias becomes zeros when the experts have biases."""
    E, d, per = tensors["experts.w_up"].shape
    inverse = torch.argsort(perm)
    out = {"up.weight": tensors["experts.w_up"].transpose(1, 2).reshape(E * per, d)[inverse],
           "down.weight": tensors["experts.w_down"].reshape(E * per, d).t()[:, inverse].contiguous()}
    if "experts.w_gate" in tensors:
        out["gate.weight"] = tensors["experts.w_gate"].transpose(1, 2).reshape(E * per, d)[inverse]
    if "experts.b_up" in tensors:
        out["up.bias"] = tensors["experts.b_up"].reshape(E * per)[inverse]
        out["down.bias"] = tensors.get("output_bias", tensors["experts.w_up"].new_zeros(d)).clone()
    if "experts.b_gate" in tensors:
        out["gate.bias"] = tensors["experts.b_gate"].reshape(E * per)[inverse]
    return out


def moefy_ffn(ffn: DenseFFN, num_experts: int, top_k: int, seed: int = 0,
              labels: torch.Tensor | None = None, **moe_kwargs) -> MoE:
    """An unweighted top-k MoE holding exactly the dense FFN's units, grouped by balanced k-means
    (or by the given `labels`, (F,) expert of each unit, equal group sizes), with its router
    initialised from the cluster centroids."""
    w_in_FD = ffn.up.weight.detach()
    F_, d = w_in_FD.shape
    if labels is None:
        labels = balanced_kmeans(w_in_FD, num_experts, seed=seed)
    perm = torch.argsort(labels.cpu(), stable=True).to(w_in_FD.device)  # units grouped by expert
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=F_ // num_experts,
                    activation=ffn.activation, bias=ffn.up.bias is not None, weighted=False,
                    renormalize=False, capacity_factor=0.0, **moe_kwargs)
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the run's RNG
        moe = MoE(d, cfg).to(w_in_FD.device, w_in_FD.dtype)
    if ffn.up.bias is not None:
        moe.experts.b_down = None  # the down bias is added once (output_bias), not per expert
    if ffn.down.bias is not None:
        moe.output_bias = nn.Parameter(torch.zeros_like(ffn.down.bias))
    params = dict(moe.named_parameters())
    with torch.no_grad():
        for name, value in dense_to_experts(dict(ffn.named_parameters()), perm, num_experts).items():
            params[name].copy_(value)
        moe.router.gate.weight.copy_(centroid_router(w_in_FD, labels.to(w_in_FD.device), num_experts))
    moe.register_buffer("unit_permutation", perm)
    return moe


def centroid_router(w_in_FD: torch.Tensor, labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Router weights (E, d): expert e scores x . c_e, c_e the normalised mean of its units'
    normalised W_in rows, rescaled to the mean norm of a W_in row (MoEfication)."""
    normed = nn.functional.normalize(w_in_FD.float(), dim=-1)
    scale = w_in_FD.float().norm(dim=-1).mean()
    return (_centroids(normed, labels, num_experts) * scale).to(w_in_FD.dtype)


def merge_moe(moe: MoE, activation: str | None = None) -> DenseFFN:
    """The dense FFN of an MoE's experts, in the original unit order when the MoE came from
    `moefy_ffn` (equal to the FFN it was split from)."""

    E, d, per = moe.experts.w_up.shape
    cfg = ModelConfig(n_embd=d, n_head=1, ffn_hidden=E * per, activation=activation or moe.cfg.activation,
                      mlp_bias=moe.experts.b_up is not None)
    with torch.random.fork_rng(devices=[]):
        ffn = DenseFFN(cfg).to(moe.experts.w_up.device, moe.experts.w_up.dtype)
    perm = getattr(moe, "unit_permutation", torch.arange(E * per, device=moe.experts.w_up.device))
    params = dict(ffn.named_parameters())
    with torch.no_grad():
        for name, value in experts_to_dense(dict(moe.named_parameters()), perm).items():
            params[name].copy_(value)
    return ffn
