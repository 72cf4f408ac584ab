"""The MoE layer, read as a learner would: routing, capacity and dropped tokens against a plain
per-token Python loop (`reference_moe`), outputs and gradients. The loop is the definition; the
layer's routing plan, dispatch into (E, C, d) buffers and batched experts must compute the same."""

import math

import torch

from minillm.activations import ACTIVATIONS
from minillm.moe import MoE, MoEConfig


def reference_moe(moe: MoE, x_Td: torch.Tensor) -> torch.Tensor:
    """Top-k routing with a capacity of C = ceil(cf * k * T / E) slots per expert, first come first
    served (all first choices, in token order, before any second choice); a choice that finds its
    expert full is dropped, and a token's output is the weighted sum of its kept choices."""
    cfg, ex = moe.cfg, moe.experts
    probs_TE = (x_Td @ moe.router.gate.weight.T).softmax(-1)
    weight_TK, expert_TK = probs_TE.topk(cfg.top_k, dim=-1)
    weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)  # renormalised over the k choices
    capacity = max(math.ceil(cfg.capacity_factor * cfg.top_k * len(x_Td) / cfg.num_experts),
                   cfg.min_capacity)
    used, outputs = [0] * cfg.num_experts, [torch.zeros_like(x_Td[0]) for _ in x_Td]
    for k in range(cfg.top_k):
        for t in range(len(x_Td)):
            e = int(expert_TK[t, k])
            if used[e] < capacity:
                used[e] += 1
                hidden = ACTIVATIONS[cfg.activation](x_Td[t] @ ex.w_up[e])
                outputs[t] = outputs[t] + weight_TK[t, k] * (hidden @ ex.w_down[e])
    return torch.stack(outputs)


def test_the_moe_layer_equals_a_per_token_loop_with_capacity_and_drops():
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=8, capacity_factor=0.5, min_capacity=1,
                    priority="position", aux_loss_coef=0.0, z_loss_coef=0.0)
    moe = MoE(6, cfg).train()  # training: capacity applies (eval is dropless by default)
    x_Td = torch.randn(24, 6, requires_grad=True)

    y, _ = moe(x_Td[None])
    assert moe.stats["dropped_fraction"] > 0.2  # capacity 3 per expert for 48 choices: many drop
    y_ref = reference_moe(moe, x_Td)
    torch.testing.assert_close(y[0], y_ref, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(y_ref)
    params = [x_Td, moe.router.gate.weight, moe.experts.w_up, moe.experts.w_down]
    grads = torch.autograd.grad((y[0] * upstream).sum(), params)
    grads_ref = torch.autograd.grad((y_ref * upstream).sum(), params)
    for name, g, g_ref in zip(["x", "router", "w_up", "w_down"], grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
