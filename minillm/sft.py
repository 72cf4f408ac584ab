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

`PackedLoader` serves packed windows to `minillm.train.Trainer` as a data source: batches
`(x, y, forward_kwargs)` whose kwargs carry the positions and the block-diagonal mask, epochs
shuffled by a seed and split over ranks, state (epoch, cursor) for exact resume, like `TokenLoader`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
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


class PackedLoader:
    """Packed supervised windows as a trainer data source (see `Trainer(data_source=...)`).

    `next_batch()` gives (inputs, targets, {"position_ids", "attn_mask"}) of `batch_size` windows
    (no kwargs with `attend_across=True`: plain causal attention). Epochs visit the windows in the
    order of a permutation seeded by (seed, epoch); rank r of W takes every W-th window, the
    remainder of an epoch is dropped so ranks stay in step. `val` (encoded examples) are packed the
    same way for `eval_batches`."""

    def __init__(self, encoded: Iterable[tuple[list[int], list[int]]], block_size: int,
                 batch_size: int, pad_id: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 attend_across: bool = False, device: str | torch.device = "cpu",
                 val: Iterable[tuple[list[int], list[int]]] | None = None):
        self.packed = pack(encoded, block_size, pad_id, attend_across)
        self.val = pack(val, block_size, pad_id, attend_across) if val is not None else None
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.rank, self.world_size, self.attend_across = rank, world_size, attend_across
        self.device = torch.device(device)
        self.names = ["sft"]
        self.windows_per_rank = len(self.packed.inputs) // world_size
        if self.windows_per_rank < batch_size:
            raise UserError(f"{len(self.packed.inputs)} packed window(s) of {block_size} tokens give "
                             f"{self.windows_per_rank} per rank, fewer than batch_size {batch_size}")
        self.epoch, self.cursor = 0, 0

    def _order(self, epoch: int) -> np.ndarray:
        n = self.windows_per_rank * self.world_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.packed.inputs))
        return perm[:n].reshape(self.windows_per_rank, self.world_size)[:, self.rank]

    def _batch(self, packed: PackedBatch, rows) -> tuple[torch.Tensor, torch.Tensor, dict]:
        idx = torch.as_tensor(rows, dtype=torch.long)

        def to_device(t):  # pinned and non-blocking on a GPU, so the loop does not wait for it
            if self.device.type == "cuda":
                return t.pin_memory().to(self.device, non_blocking=True)
            return t.to(self.device)

        x, y = to_device(packed.inputs[idx]), to_device(packed.targets[idx])
        if self.attend_across:
            return x, y, {}
        return x, y, {"position_ids": to_device(packed.position_ids[idx]),
                      "attn_mask": attention_mask(to_device(packed.segment_ids[idx]))}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, dict]:
        rows = []
        for _ in range(self.batch_size):
            if self.cursor == self.windows_per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
            rows.append(int(self._order(self.epoch)[self.cursor]))
            self.cursor += 1
        return self._batch(self.packed, rows)

    def eval_batches(self, max_windows: int | None, rank: int, world_size: int
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict]]:
        """The first `max_windows` validation windows, dealt to ranks in turn; every rank yields
        the same number of batches (a rank whose share ran out gets a row with no target)."""
        if self.val is None or len(self.val.inputs) == 0:
            raise UserError("PackedLoader has no validation examples (pass val=...)")
        total = len(self.val.inputs) if max_windows is None else min(len(self.val.inputs), max_windows)
        mine = list(range(rank, total, world_size))
        per_rank = -(-total // world_size)
        for b in range(-(-per_rank // self.batch_size)):
            rows = mine[b * self.batch_size:(b + 1) * self.batch_size]
            x, y, kwargs = self._batch(self.val, rows or [0])
            if not rows:
                y = torch.full_like(y, IGNORE_INDEX)
            yield x, y, kwargs

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "world_size": self.world_size, "num_windows": len(self.packed.inputs)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "num_windows"):
            if state.get(key) != self.state_dict()[key]:
                raise UserError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                f"{self.state_dict()[key]!r}: the stream cannot be continued exactly")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
