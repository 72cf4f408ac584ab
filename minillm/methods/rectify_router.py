"""Rectify-Router (Zeng et al. 2024, "Turn Waste into Worth: Rectifying Top-k Router of MoE").

Top-k routing with capacity wastes compute twice: tokens past an expert's capacity are *dropped*
(only the residual passes), and experts that receive fewer than C tokens compute *padding*. Two
plan transforms (see minillm/moe.py) rectify this:

- **Intra-GPU Rectification** (`IntraGPURectification`): a dropped token is sent to the expert with
  its highest router probability among the experts on its own GPU, so no all-to-all is needed; that
  entry is computed outside the capacity buffer. The token's output becomes
  y = (sum_kept p_i E_i(x) + s p_j E_j(x)) / (sum_kept p_i + s p_j), s = k - (kept slots), with the
  denominator detached and clamped. Which tokens count as dropped (lost `all`, `any`, or
  `all_but_one` of their k slots) is a parameter. Under expert parallelism (minillm.moe.MoE with
  an `ep_group`) the plan says where each token and expert lives: its rank. On one process,
  experts are split evenly over `num_devices` virtual devices and tokens likewise (token t lives
  on device t * G // T). A token
  whose local experts are all already among its kept ones has no candidate and stays as it was.
  Rectified entries are computed outside the capacity buffer, so capacity does not limit them: an
  expert can receive up to all of its device's dropped tokens on top of its C buffered ones (the
  paper's form; `max_per_expert` bounds it, the highest router probabilities first).
- **Fill-in Rectification** (`FillInRectification`): each expert's empty slots are filled with the
  tokens of highest router probability for that expert among tokens not already routed to it. A
  filled-in token adds that expert's output with weight p (divided by the sum of the token's top-k
  probabilities when the router renormalises, so that it is on the scale of its other weights).
  `variant="top_k_plus_one"` is the public code's form: only each token's (k+1)-th choice may fill
  an empty slot, highest score first. The selection is one `torch.topk` over tokens for all
  experts at once; it has no hand-written kernel (topk is already a single GPU kernel).

Applied together, Intra-GPU first, then Fill-in: `MoE(d, cfg, plan_transforms=[intra, fill])`.
When no expert overflows and none pads, both transforms leave the plan unchanged.
"""

from __future__ import annotations

import dataclasses

import torch

from ..moe import DROPPED, OUTSIDE, RoutingPlan, assign_slots


def _replace(plan: RoutingPlan, token, expert, slot, weight) -> RoutingPlan:
    return dataclasses.replace(plan, token=token, expert=expert, slot=slot, weight=weight)


class IntraGPURectification:
    def __init__(self, num_devices: int = 1, dropped_when: str = "all", eps: float = 1e-6,
                 max_per_expert: int | None = None):
        if dropped_when not in ("all", "any", "all_but_one"):
            raise ValueError(f"dropped_when must be all, any or all_but_one, got {dropped_when!r}")
        self.num_devices, self.dropped_when, self.eps = num_devices, dropped_when, eps
        self.max_per_expert = max_per_expert  # None: rectified entries are not limited

    def spec(self) -> dict:
        """Constructor arguments, for MoE checkpoints (minillm.moe.moe_spec)."""
        return {"num_devices": self.num_devices, "dropped_when": self.dropped_when,
                "eps": self.eps, "max_per_expert": self.max_per_expert}

    def devices(self, plan: RoutingPlan) -> tuple[torch.Tensor, torch.Tensor]:
        """(device of each token (T,), device of each expert (E,)): the plan's real placement
        under expert parallelism, else `num_devices` virtual devices, each holding E / G experts
        and a contiguous run of T / G tokens."""
        if plan.token_device_T is not None:
            return plan.token_device_T, plan.expert_device_E
        T, E = plan.probs_TE.shape
        G, device = self.num_devices, plan.probs_TE.device
        if E % G:
            raise ValueError(f"{E} experts do not split over {G} devices")
        return torch.arange(T, device=device) * G // T, torch.arange(E, device=device) // (E // G)

    def __call__(self, plan: RoutingPlan) -> RoutingPlan:
        T, E = plan.probs_TE.shape
        k = plan.top_k
        token_device_T, expert_device_E = self.devices(plan)
        first = slice(0, T * k)  # the router's own entries
        kept_TK = (plan.slot[first] >= 0).view(k, T).t()
        n_kept_T = kept_TK.sum(-1)
        limit = {"all": 0, "any": k - 1, "all_but_one": 1}[self.dropped_when]
        rectify_T = (n_kept_T <= limit) & (n_kept_T < k)  # a token that kept all k is never dropped
        if not bool(rectify_T.any()):
            return plan
        tokens = torch.nonzero(rectify_T).squeeze(-1)
        # best expert on the token's own device
        local_mask_TE = expert_device_E[None, :] == token_device_T[:, None]
        # ... excluding experts the token already kept a slot on (they would add nothing new)
        expert_TK = plan.expert[first].view(k, T).t()
        kept_TE = torch.zeros(T, E, dtype=torch.bool, device=tokens.device)
        kept_TE.scatter_(1, expert_TK, kept_TK)
        allowed = local_mask_TE[tokens] & ~kept_TE[tokens]
        has_candidate = allowed.any(-1)  # else argmax would pick a masked (non-local) expert
        tokens, allowed = tokens[has_candidate], allowed[has_candidate]
        best = plan.probs_TE[tokens].detach().masked_fill(~allowed, -1.0).argmax(-1)
        if self.max_per_expert is not None:  # the highest probabilities win an expert's places
            rank = assign_slots(best, -plan.probs_TE[tokens, best].detach(), E, self.max_per_expert)
            tokens, best = tokens[rank >= 0], best[rank >= 0]
        if not len(tokens):
            return plan
        p_best = plan.probs_TE[tokens, best]
        # the rectified token's output: (sum_kept p_i E_i + s p_j E_j) / detached denominator
        p_TK = plan.probs_TE.gather(1, expert_TK)
        kept_sum = (p_TK * kept_TK).sum(-1)[tokens]
        s = (k - n_kept_T[tokens]).to(p_best.dtype)
        denom = (kept_sum + s * p_best).detach().clamp_min(self.eps)
        weight = plan.weight.clone()
        entry_TK = torch.arange(T * k, device=tokens.device).view(k, T).t()
        for c in range(k):  # the kept entries of rectified tokens get p_i / denominator
            rows = entry_TK[tokens, c]
            weight[rows] = torch.where(kept_TK[tokens, c], p_TK[tokens, c] / denom, weight[rows])
        new_weight = s * p_best / denom
        return _replace(plan,
                        torch.cat([plan.token, tokens]), torch.cat([plan.expert, best]),
                        torch.cat([plan.slot, torch.full_like(tokens, OUTSIDE)]),
                        torch.cat([weight, new_weight]))


class FillInRectification:
    def __init__(self, variant: str = "global"):
        if variant not in ("global", "top_k_plus_one"):
            raise ValueError(f"variant must be global or top_k_plus_one, got {variant!r}")
        self.variant = variant

    def spec(self) -> dict:
        """Constructor arguments, for MoE checkpoints (minillm.moe.moe_spec)."""
        return {"variant": self.variant}

    def __call__(self, plan: RoutingPlan) -> RoutingPlan:
        T, E = plan.probs_TE.shape
        C = plan.capacity
        used_E = torch.bincount(plan.expert[plan.kept], minlength=E)
        empty_E = C - used_E
        if not bool((empty_E > 0).any()):
            return plan
        routed_TE = torch.zeros(T, E, dtype=torch.bool, device=used_E.device)
        routed_TE[plan.token, plan.expert] = True  # kept, dropped or outside: already routed there
        score_TE = plan.probs_TE.detach().masked_fill(routed_TE, -1.0)
        if self.variant == "top_k_plus_one":  # only each token's next choice is a candidate
            nxt = score_TE.argmax(-1)
            only = torch.full_like(score_TE, -1.0)
            only[torch.arange(T), nxt] = score_TE[torch.arange(T), nxt]
            score_TE = only
        # one top-n over tokens for all experts at once (n = the most empty slots of any expert)
        n = min(int(empty_E.max()), T)  # host sync: the selection's size
        top_score_nE, top_token_nE = score_TE.topk(n, dim=0)
        take_nE = (torch.arange(n, device=used_E.device)[:, None] < empty_E[None, :]) & (top_score_nE >= 0)
        token_M = top_token_nE.t()[take_nE.t()]  # expert-major, best candidates first
        expert_M = torch.arange(E, device=used_E.device)[:, None].expand(E, n)[take_nE.t()]
        if not len(token_M):
            return plan
        # slots: after the expert's used slots, in candidate order
        slot_M = assign_slots(expert_M, torch.arange(len(token_M), device=token_M.device), E, C)
        slot_M = torch.where(slot_M >= 0, slot_M + used_E[expert_M], torch.full_like(slot_M, DROPPED))
        p_M = plan.probs_TE[token_M, expert_M]
        w_M = (torch.ones_like(p_M) if plan.weight_norm_T is None
               else p_M / plan.weight_norm_T[token_M])  # on the scale of the token's other weights
        return _replace(plan, torch.cat([plan.token, token_M]), torch.cat([plan.expert, expert_M]),
                        torch.cat([plan.slot, slot_M]), torch.cat([plan.weight, w_M]))
