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

from .model import DenseFFN
from .moe import MoE, MoEConfig


def balanced_kmeans(points_ND: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Cluster labels (N,) with exactly N / k points per cluster, by cosine similarity.

    Each round assigns greedily: points in order of how strongly they prefer their best cluster
    (largest margin first) take their best cluster that still has room; centroids are then the
    normalised means. Deterministic for a seed."""
    N = len(points_ND)
    if N % k:
        raise ValueError(f"{N} points do not split into {k} equal clusters")
    size = N // k
    x = nn.functional.normalize(points_ND.float(), dim=-1)
    g = torch.Generator().manual_seed(seed)
    centroids_KD = x[torch.randperm(N, generator=g)[:k]]
    labels = torch.zeros(N, dtype=torch.long)
    for _ in range(iters):
        scores_NK = x @ centroids_KD.t()
        top2 = scores_NK.topk(min(2, k), dim=-1).values
        margin = top2[:, 0] - (top2[:, 1] if k > 1 else 0)
        room = torch.full((k,), size)
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
        centroids_KD = nn.functional.normalize(torch.stack([x[labels == c].mean(0) for c in range(k)]),
                                               dim=-1)
    return labels


def moefy_ffn(ffn: DenseFFN, num_experts: int, top_k: int, seed: int = 0, **moe_kwargs) -> MoE:
    """An unweighted top-k MoE holding exactly the dense FFN's units, grouped by balanced k-means,
    with its router initialised from the cluster centroids."""
    w_in_FD = ffn.up.weight.detach()
    F_, d = w_in_FD.shape
    labels = balanced_kmeans(w_in_FD, num_experts, seed=seed)
    perm = torch.argsort(labels, stable=True)  # units grouped by expert
    per = F_ // num_experts
    cfg = MoEConfig(num_experts=num_experts, top_k=top_k, expert_hidden=per,
                    activation=ffn.activation, bias=ffn.up.bias is not None, weighted=False,
                    renormalize=False, capacity_factor=0.0, **moe_kwargs)
    moe = MoE(d, cfg).to(w_in_FD.device, w_in_FD.dtype)
    with torch.no_grad():
        moe.experts.w_up.copy_(w_in_FD[perm].view(num_experts, per, d).transpose(1, 2))
        if ffn.gate is not None:
            moe.experts.w_gate.copy_(ffn.gate.weight[perm].view(num_experts, per, d).transpose(1, 2))
        moe.experts.w_down.copy_(ffn.down.weight[:, perm].t().reshape(num_experts, per, d))
        if ffn.up.bias is not None:
            moe.experts.b_up.copy_(ffn.up.bias[perm].view(num_experts, 1, per))
            if ffn.gate is not None:
                moe.experts.b_gate.copy_(ffn.gate.bias[perm].view(num_experts, 1, per))
            moe.experts.b_down = None  # the down bias is added once, not once per expert
        if ffn.down.bias is not None:
            moe.output_bias = nn.Parameter(ffn.down.bias.detach().clone())
        normed = nn.functional.normalize(w_in_FD.float(), dim=-1)
        centroids = torch.stack([normed[labels == e].mean(0) for e in range(num_experts)])
        scale = w_in_FD.float().norm(dim=-1).mean()
        moe.router.gate.weight.copy_(nn.functional.normalize(centroids, dim=-1) * scale)
    moe.register_buffer("unit_permutation", perm)
    return moe


def merge_moe(moe: MoE, activation: str | None = None) -> DenseFFN:
    """The dense FFN of an MoE's experts, in the original unit order when the MoE came from
    `moefy_ffn` (equal to the FFN it was split from)."""
    from .model import ModelConfig

    E, d, per = moe.experts.w_up.shape
    cfg = ModelConfig(n_embd=d, n_head=1, ffn_hidden=E * per, activation=activation or moe.cfg.activation,
                      mlp_bias=moe.experts.b_up is not None)
    ffn = DenseFFN(cfg).to(moe.experts.w_up.device, moe.experts.w_up.dtype)
    perm = getattr(moe, "unit_permutation", torch.arange(E * per))
    inverse = torch.argsort(perm)
    with torch.no_grad():
        ffn.up.weight.copy_(moe.experts.w_up.transpose(1, 2).reshape(E * per, d)[inverse])
        if ffn.gate is not None:
            ffn.gate.weight.copy_(moe.experts.w_gate.transpose(1, 2).reshape(E * per, d)[inverse])
        ffn.down.weight.copy_(moe.experts.w_down.reshape(E * per, d).t()[:, inverse])
        if ffn.up.bias is not None:
            ffn.up.bias.copy_(moe.experts.b_up.reshape(E * per)[inverse])
            if ffn.gate is not None:
                ffn.gate.bias.copy_(moe.experts.b_gate.reshape(E * per)[inverse])
            ffn.down.bias.copy_(moe.output_bias if moe.output_bias is not None else torch.zeros(d))
    return ffn
