"""Continuous batching over the KV cache: many generation requests share one batch, step by step.

`generate_ids` runs one batch from start to end, so a request that arrives meanwhile waits for the
whole batch. A server instead schedules at every step (iteration-level scheduling; Yu et al.,
"Orca: A Distributed Serving System for Transformer-Based Generative Models", OSDI 2022). One
thread owns the model and a batch of running sequences with one KV cache, and each step it

    1. admits waiting requests while rows are free, prefilling their prompts in one left-padded
       pass and merging them into the batch,
    2. picks one token for every row,
    3. drops the rows that finished, and those whose client went away,
    4. runs one decode step (one token per row, through the KV cache) for the rest.

A request joins at the next step instead of waiting for the batch to drain, and leaves as soon as
it is done.

The cache is a bag of keys per row: positions enter through `position_ids` and the attention mask
hides every column that is not the row's own, so rows can be moved freely. Each row's tokens fill
the last columns of the cache (right-aligned, as `generate_ids` left-pads), so merging or dropping
rows is one copy that keeps only the columns some row still uses (`Scheduler._relayout`).

A row's tokens do not depend on its neighbours: greedy rows take the argmax, sampled rows draw from
their own `torch.Generator`, so a sequence gets what `generate_ids` gives its prompt alone with
that seed (up to float rounding across batch shapes, which can flip a near-tie).
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .generate import left_pad, padded_mask, sample_next
from .model import GPT, KVCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is extended. logprobs: None for none, k >= 0 for the chosen token's
    log-prob plus the k most likely tokens'; echo: also the prompt tokens' log-probs."""
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None
    echo: bool = False


class Sequence:
    """One choice of one request: a prompt the scheduler extends. The scheduler reports to `emit`
    from its own thread: ("prompt", logprobs, tops) once when echo is asked (the first logprob is
    None), ("token", id, logprob, top) for every kept token, then ("done", finish_reason) or
    ("error", message). `cancelled = True` (a client that left) drops it at the next step."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 seed: int | None = None, emit: Callable[[tuple], None] | None = None):
        self.prompt_ids, self.params, self.stop_ids = list(prompt_ids), params, stop_ids
        self.seed = seed if seed is not None else secrets.randbits(62)
        self.emit = emit or (lambda event: None)
        self.new_ids: list[int] = []
        self.generator: torch.Generator | None = None
        self.cancelled = False
        self.finished = False

    def finish(self, reason: str) -> None:
        self.finished = True
        self.emit(("done", reason))


class QueueFull(Exception):
    """`max_queue` requests are already waiting for rows."""


class Scheduler:
    """Continuous batching over the KV cache (see the module docstring), on its own thread.

    `submit(sequences)` queues one request (its choices are admitted together); `start()` and
    `close()` run and stop the thread. State of the running batch: `rows` (B sequences), one
    KVCache whose `length` K columns are described by `valid_BK` (True on a row's own columns,
    which are its last columns), each row's last position `pos_B`, and the logits `logits_BV` its
    next token is drawn from."""

    def __init__(self, model: GPT, tokenizer, max_batch: int = 16, max_queue: int = 64):
        if max_batch < 1 or max_queue < 1:
            raise UserError("max_batch and max_queue must be at least 1")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.device = model.wte.weight.device
        # A model whose embedding is padded past the tokenizer (e.g. 50,304 rows for 50,257
        # tokens) never picks a padding id: logits stop at the tokenizer's last id.
        self.vocab = tokenizer.vocab_size if tokenizer is not None else model.config.vocab_size
        self._waiting: deque[list[Sequence]] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.rows: list[Sequence] = []
        self.cache: KVCache | None = None
        self.valid_BK = self.pos_B = self.logits_BV = None
        self.stats = {"steps": 0, "prefills": 0, "rows_served": 0, "peak_rows": 0}

    # --- the queue -----------------------------------------------------------------------------

    def submit(self, sequences: list[Sequence]) -> None:
        if len(sequences) > self.max_batch:
            raise ValueError(f"{len(sequences)} sequences in one request; at most {self.max_batch}")
        with self._cv:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are already waiting")
            self._waiting.append(sequences)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        """Requests waiting for rows."""
        return len(self._waiting)

    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="minillm-scheduler",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread; every sequence still waiting or running gets an error event."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        left = self.rows + [s for group in self._waiting for s in group]
        self._waiting.clear()
        self._reset()
        for s in left:
            s.emit(("error", "the server is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not self.rows:
                    self._cv.wait()
                if self._stopping:
                    return
                joiners = self._admit()
            try:
                with torch.no_grad():
                    self.step(joiners)
            except Exception as e:  # a failure inside the model fails its batch, not the server
                log.exception("a scheduler step failed; failing the %d rows of its batch",
                              len(self.rows))
                for s in {id(s): s for s in self.rows + joiners}.values():
                    if not s.finished:
                        s.emit(("error", f"generation failed: {type(e).__name__}: {e}"))
                self._reset()

    def _admit(self) -> list[Sequence]:
        """Whole requests from the front of the queue while their rows fit (first come, first
        served: a large request is not overtaken)."""
        free, joiners = self.max_batch - len(self.rows), []
        while self._waiting:
            group = [s for s in self._waiting[0] if not s.cancelled]
            if len(group) > free:
                break
            self._waiting.popleft()
            joiners += group
            free -= len(group)
        return joiners

    def _reset(self) -> None:
        self.rows, self.cache = [], None
        self.valid_BK = self.pos_B = self.logits_BV = None

    # --- one step ------------------------------------------------------------------------------

    def step(self, joiners: list[Sequence]) -> None:
        """Prefill `joiners` into the batch, pick a token for every row, drop finished rows, and
        run one decode step for the others."""
        if joiners:
            self._prefill(joiners)
        if not self.rows:
            return
        self._pick_tokens()
        keep = [b for b, s in enumerate(self.rows) if not s.finished and not s.cancelled]
        if len(keep) < len(self.rows):
            self.stats["rows_served"] += len(self.rows) - len(keep)
            if not keep:
                self._reset()
                return
            rows = [self.rows[b] for b in keep]
            idx_B = torch.tensor(keep, device=self.device)
            self.cache, self.valid_BK = self._relayout([(self.cache, self.valid_BK, idx_B)], rows)
            self.rows, self.pos_B = rows, self.pos_B[idx_B]
        self._decode()

    def _prefill(self, joiners: list[Sequence]) -> None:
        """One left-padded forward pass over the joiners' prompts; then they join the batch."""
        ids_BL, valid_BL = left_pad([s.prompt_ids for s in joiners], self.device)
        B, L = ids_BL.shape
        positions_BL = (valid_BL.long().cumsum(-1) - 1).clamp(min=0)
        cache = self.model.new_kv_cache(B, L)
        logits_BLV = self.model(ids_BL, position_ids=positions_BL,
                                attn_mask=padded_mask(valid_BL, L),
                                kv_cache=cache).logits[..., :self.vocab]
        for b, s in enumerate(joiners):
            s.generator = torch.Generator(device=self.device).manual_seed(s.seed)
            if s.params.echo:
                self._emit_prompt_logprobs(s, logits_BLV[b, L - len(s.prompt_ids):])
        self.stats["prefills"] += 1
        parts, rows = [(cache, valid_BL, torch.arange(B, device=self.device))], list(joiners)
        if self.rows:
            everyone = torch.arange(len(self.rows), device=self.device)
            parts.insert(0, (self.cache, self.valid_BK, everyone))
            rows = self.rows + rows
        self.cache, self.valid_BK = self._relayout(parts, rows)
        self.rows = rows
        self.stats["peak_rows"] = max(self.stats["peak_rows"], len(rows))
        new_pos_B, new_logits_BV = positions_BL[:, -1], logits_BLV[:, -1]
        if self.pos_B is None:
            self.pos_B, self.logits_BV = new_pos_B, new_logits_BV
        else:
            self.pos_B = torch.cat([self.pos_B, new_pos_B])
            self.logits_BV = torch.cat([self.logits_BV, new_logits_BV])

    def _emit_prompt_logprobs(self, s: Sequence, logits_PV: torch.Tensor) -> None:
        """Log-prob of each prompt token given those before it (None for the first)."""
        logp_PV = F.log_softmax(logits_PV.float(), dim=-1)
        prompt_P = torch.as_tensor(s.prompt_ids, device=self.device)
        logps = [None] + logp_PV[:-1].gather(1, prompt_P[1:, None])[:, 0].tolist()
        tops = [None] * len(s.prompt_ids)
        if s.params.logprobs:
            k = min(s.params.logprobs, logp_PV.shape[-1])
            values, ids = logp_PV[:-1].topk(k, dim=-1)
            tops[1:] = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        s.emit(("prompt", logps, tops))

    def _relayout(self, parts: list[tuple[KVCache, torch.Tensor, torch.Tensor]],
                  rows: list[Sequence]) -> tuple[KVCache, torch.Tensor]:
        """One cache holding the rows `idx_B` of each (cache, valid_BK, idx_B), in order, each
        row right-aligned; it is as wide as the longest row and has room for every row's
        remaining tokens."""
        width = max(int(valid_BK[idx_B].sum(dim=1).max()) for _, valid_BK, idx_B in parts)
        room = max(s.params.max_tokens - len(s.new_ids) for s in rows)
        new = self.model.new_kv_cache(len(rows), width + max(room, 1))
        valid_BW = torch.zeros(len(rows), width, dtype=torch.bool, device=self.device)
        start = 0
        for cache, valid_BK, idx_B in parts:
            K = cache.length
            t, end = min(K, width), start + len(idx_B)  # a row's columns are its last ones
            for layer in range(len(new.k)):
                new.k[layer][start:end, :, width - t:width] = cache.k[layer][idx_B, :, K - t:K]
                new.v[layer][start:end, :, width - t:width] = cache.v[layer][idx_B, :, K - t:K]
            valid_BW[start:end, width - t:] = valid_BK[idx_B, K - t:]
            start = end
        new.advance(width)
        return new, valid_BW

    def _pick_tokens(self) -> None:
        """One token for every row from `logits_BV`; emits it and finishes rows that are done."""
        logits_BV = self.logits_BV
        logp_BV = F.log_softmax(logits_BV.float(), dim=-1)
        tokens_B = logits_BV.argmax(dim=-1)
        for b, s in enumerate(self.rows):
            if s.params.temperature > 0:  # each row from its own generator
                tokens_B[b] = sample_next(logits_BV[b:b + 1], s.params.temperature, s.params.top_k,
                                          s.params.top_p, s.generator)[0]
        logps = logp_BV.gather(1, tokens_B[:, None])[:, 0].tolist()
        tokens = tokens_B.tolist()
        for b, s in enumerate(self.rows):
            if s.cancelled:
                continue
            if len(s.new_ids) >= s.params.max_tokens:  # max_tokens 0: the prompt only (echo)
                s.finish("length")
                continue
            if tokens[b] in s.stop_ids:
                s.finish("stop")
                continue
            s.new_ids.append(tokens[b])
            top = None
            if s.params.logprobs:
                values, ids = logp_BV[b].topk(min(s.params.logprobs, logp_BV.shape[-1]))
                top = list(zip(ids.tolist(), values.tolist()))
            s.emit(("token", tokens[b], logps[b], top))
            if s.params.stop:
                tail = self.tokenizer.decode(s.new_ids[-32:])  # a stop string spans few tokens
                if any(stop in tail for stop in s.params.stop):
                    s.finish("stop")
                    continue
            if len(s.new_ids) == s.params.max_tokens:
                s.finish("length")

    def _decode(self) -> None:
        """Feed every row's last token through the cache: the logits of its next one."""
        B = len(self.rows)
        tokens_B1 = torch.tensor([[s.new_ids[-1]] for s in self.rows], device=self.device)
        self.pos_B = self.pos_B + 1
        self.valid_BK = torch.cat(
            [self.valid_BK, torch.ones(B, 1, dtype=torch.bool, device=self.device)], dim=1)
        self.logits_BV = self.model(tokens_B1, position_ids=self.pos_B[:, None],
                                    attn_mask=padded_mask(self.valid_BK, 1),
                                    kv_cache=self.cache).logits[:, -1, :self.vocab]
        self.stats["steps"] += 1


__all__ = ["QueueFull", "SamplingParams", "Scheduler", "Sequence"]
