"""Supervised examples (prompt, response): loss only on the response, and packing into windows.

An example becomes `prompt + response + <|endoftext|>`; inputs are all tokens but the last, targets
all but the first (the same shift as `TokenLoader`), and the targets that are prompt tokens are -100,
the label the model's loss ignores. So the model learns to produce the response and to stop.

Packing puts several examples into one window of `block_size` tokens so that no compute is spent on
padding. It is a choice with two documented settings:

- `attend_across=False` (default): each example sees only itself. The batch carries `segment_ids`
  (0 for padding, 1, 2, ... for examples) and `position_ids` that restart at 0 for every example;
  `attention_mask(segment_ids)` is the block-diagonal causal mask for
  `scaled_dot_product_attention`. Results equal those of the examples run one by one.
- `attend_across=True`: plain causal attention over the whole window, positions 0..T-1, as in
  pretraining on concatenated documents (cheaper: no mask, flash attention stays usable; examples
  see earlier, unrelated examples).

Padding fills the rest of a window with `pad_id` and target -100.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .tokenizer import Tokenizer

IGNORE_INDEX = -100


@dataclass
class Example:
    prompt: str
    response: str


def encode_example(tokenizer: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(inputs, targets) of one example; targets that are prompt tokens are IGNORE_INDEX."""
    prompt_ids = tokenizer.encode_ordinary(prompt)
    tokens = prompt_ids + tokenizer.encode_ordinary(response) + [tokenizer.eot_id]
    targets = tokens[1:]
    n_prompt_targets = max(len(prompt_ids) - 1, 0)
    targets[:n_prompt_targets] = [IGNORE_INDEX] * n_prompt_targets
    return tokens[:-1], targets


@dataclass
class PackedBatch:
    """Packed windows, all (N, T): inputs, targets, example index per position (0 = padding) and
    position within its example. `stats` counts examples packed, truncated and dropped."""
    inputs: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor
    stats: dict


def pack(encoded: Iterable[tuple[list[int], list[int]]], block_size: int, pad_id: int,
         attend_across: bool = False) -> PackedBatch:
    """Pack encoded examples into windows of `block_size`, greedily in order: an example goes into
    the current window if it fits, else starts a new one. An example longer than `block_size` is
    truncated to it; one left with no target to learn is dropped."""
    windows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    stats = {"examples": 0, "truncated": 0, "dropped": 0}
    for inputs, targets in encoded:
        if len(inputs) > block_size:
            inputs, targets = inputs[:block_size], targets[:block_size]
            stats["truncated"] += 1
        if all(t == IGNORE_INDEX for t in targets):
            stats["dropped"] += 1
            continue
        if used + len(inputs) > block_size:
            windows.append([])
            used = 0
        windows[-1].append((inputs, targets))
        used += len(inputs)
        stats["examples"] += 1
    windows = [w for w in windows if w]
    n = len(windows)
    inputs_NT = torch.full((n, block_size), pad_id, dtype=torch.long)
    targets_NT = torch.full((n, block_size), IGNORE_INDEX, dtype=torch.long)
    segment_NT = torch.zeros((n, block_size), dtype=torch.long)
    position_NT = torch.zeros((n, block_size), dtype=torch.long)
    for row, window in enumerate(windows):
        start = 0
        for seg, (x, y) in enumerate(window, 1):
            end = start + len(x)
            inputs_NT[row, start:end] = torch.tensor(x)
            targets_NT[row, start:end] = torch.tensor(y)
            segment_NT[row, start:end] = 1 if attend_across else seg
            position_NT[row, start:end] = (torch.arange(start, end) if attend_across
                                           else torch.arange(len(x)))
            start = end
        if attend_across:
            position_NT[row, start:] = torch.arange(start, block_size)
    return PackedBatch(inputs_NT, targets_NT, segment_NT, position_NT, stats)


def attention_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean mask (N, 1, T, T) for `scaled_dot_product_attention`: query i may attend key j when
    j <= i and both lie in the same segment. Padding (segment 0) attends to padding only, so no row
    is empty (an all-masked row would give NaN)."""
    T = segment_ids.shape[-1]
    causal_TT = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same_NTT = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_NTT & causal_TT)[:, None]
