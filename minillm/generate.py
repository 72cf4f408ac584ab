"""Batched generation with a KV cache, continuation scoring, and the language-model interface.

Prompts of different lengths are left-padded into one batch. Padding is invisible: every real
token attends only to real tokens (an attention mask over keys), positions count real tokens only,
and each padding query attends to itself alone so no attention row is empty (which would give NaN).
Hence a batch produces the same tokens as each prompt alone.

`LanguageModel` is the small interface that evaluation and reasoning methods code against
(`generate` text for a batch of prompts, `score` continuations by log-likelihood); `LocalLM` is
minillm's implementation, and a remote model can stand in by implementing the same two methods
(`minillm.backends.OpenAIClient` speaks to any OpenAI-compatible server). `generate` returns
`Completion`s: strings that also carry what token budgets need (prompt and completion token
counts) and, where the backend offers them, the generated tokens' log-probabilities.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from .model import GPT
from .tokenizer import Tokenizer


def sample_next(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,) from the last logits: greedy when temperature == 0, else sampled from
    softmax(logits / temperature) restricted to the top_k tokens and / or the smallest set whose
    probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    logits_BV = logits_BV.float() / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth_B1 = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        cum_BV = sorted_BV.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop_BV = cum_BV - sorted_BV.softmax(dim=-1) >= top_p
        logits_BV = logits_BV.scatter(-1, order_BV, sorted_BV.masked_fill(drop_BV, float("-inf")))
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid), both (B, L): the prompts right-aligned in one batch, True on real tokens."""
    L = max(len(p) for p in prompts)
    ids_BL = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    valid_BL = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty: give at least one token (e.g. <|endoftext|>)")
        ids_BL[b, L - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        valid_BL[b, L - len(p):] = True
    return ids_BL, valid_BL


def padded_mask(valid_BK: torch.Tensor, T: int) -> torch.Tensor:
    """(B, 1, T, K) mask for the last T of K positions: causal, real keys only, self always."""
    K = valid_BK.shape[1]
    causal_TK = torch.ones(T, K, dtype=torch.bool, device=valid_BK.device).tril(K - T)
    self_TK = torch.eye(T, K, dtype=torch.bool, device=valid_BK.device).roll(K - T, dims=1)
    return ((causal_TK & valid_BK[:, None, :]) | self_TK)[:, None]


@torch.no_grad()
def generate_ids(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_id: int | None = None, use_cache: bool = True,
                 should_stop: Callable[[int, list[int]], bool] | None = None,
                 return_logprobs: bool = False):
    """New token ids for each prompt (ids), at most `max_new_tokens` each. A row ends at `eos_id`
    (not included) or when `should_stop(row, new_ids)` is true (its last token is kept).
    `use_cache=False` recomputes the whole sequence every step (reference and benchmark).
    With `return_logprobs`, returns (ids, logprobs): each kept token's log-probability under the
    model's own distribution (temperature 1, no top-k / top-p), what policy-gradient methods use."""
    device = model.wte.weight.device
    ids_BL, valid_BL = left_pad(prompts, device)
    B, L = ids_BL.shape
    if model.wpe is not None and L + max_new_tokens - 1 > model.config.block_size:
        raise ValueError(f"prompt of {L} tokens + {max_new_tokens} new tokens exceeds block_size "
                         f"{model.config.block_size}")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()

    positions_BL = (valid_BL.long().cumsum(-1) - 1).clamp(min=0)
    cache = model.new_kv_cache(B, L + max_new_tokens) if use_cache else None
    logits_BV = model(ids_BL, position_ids=positions_BL, attn_mask=padded_mask(valid_BL, L),
                      kv_cache=cache).logits[:, -1]
    new = [[] for _ in range(B)]
    new_logprobs = [[] for _ in range(B)]
    done = [False] * B
    seq_BK, valid_BK, pos_B = ids_BL, valid_BL, positions_BL[:, -1]
    for step in range(max_new_tokens):
        next_B = sample_next(logits_BV, temperature, top_k, top_p, generator)
        if return_logprobs:
            logp_B = F.log_softmax(logits_BV.float(), dim=-1).gather(1, next_B[:, None])[:, 0].tolist()
        for b, token in enumerate(next_B.tolist()):
            if done[b]:
                continue
            if token == eos_id:
                done[b] = True
                continue
            new[b].append(token)
            if return_logprobs:
                new_logprobs[b].append(logp_B[b])
            if should_stop is not None and should_stop(b, new[b]):
                done[b] = True
        if all(done) or step == max_new_tokens - 1:
            break  # no forward pass for logits nobody will sample
        pos_B = pos_B + 1
        seq_BK = torch.cat([seq_BK, next_B[:, None]], dim=1)
        valid_BK = torch.cat([valid_BK, torch.ones(B, 1, dtype=torch.bool, device=device)], dim=1)
        if use_cache:
            out = model(next_B[:, None], position_ids=pos_B[:, None],
                        attn_mask=padded_mask(valid_BK, 1), kv_cache=cache)
        else:
            positions_BK = (valid_BK.long().cumsum(-1) - 1).clamp(min=0)
            out = model(seq_BK, position_ids=positions_BK,
                        attn_mask=padded_mask(valid_BK, seq_BK.shape[1]))
        logits_BV = out.logits[:, -1]
    model.train(was_training)
    return (new, new_logprobs) if return_logprobs else new


@torch.no_grad()
def continuation_logprobs(model: GPT, contexts: Sequence[Sequence[int]],
                          continuations: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Log-probability of every token of each continuation given its context (one tensor each),
    from one right-padded forward pass over context + continuation."""
    device = model.wte.weight.device
    seqs = [list(c) + list(x) for c, x in zip(contexts, continuations)]
    for c, x in zip(contexts, continuations):
        if not c or not x:
            raise ValueError("contexts and continuations must each hold at least one token")
    T = max(len(s) for s in seqs)
    ids_BT = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids_BT[b, :len(s)] = torch.as_tensor(s)
    was_training = model.training
    model.eval()
    logp_BTV = F.log_softmax(model(ids_BT).logits.float(), dim=-1)  # right padding: causal suffices
    model.train(was_training)
    out = []
    for b, (c, x) in enumerate(zip(contexts, continuations)):
        # token at position t is predicted by the logits at t - 1
        pos = torch.arange(len(c) - 1, len(c) + len(x) - 1, device=device)
        out.append(logp_BTV[b, pos, torch.as_tensor(list(x), device=device)].cpu())
    return out


# --- the language-model interface -------------------------------------------------------------------

class Completion(str):
    """Generated text that also carries its accounting. It is a `str` (the text, cut before any
    stop string), so code that wants only text uses it as one; budgets read the fields:

    prompt_tokens, completion_tokens: token counts as the backend reports them (None if it does
        not); completion_tokens counts every generated token, a cut stop string's included.
    token_logprobs: log-probability of each generated token under the model (None where the
        backend offers none); token_ids: the generated ids (local models only).
    finish_reason: "stop" (end of text or a stop string) or "length" (max_new_tokens reached).
    String operations (slicing, strip) return plain strings."""

    prompt_tokens: int | None
    completion_tokens: int | None
    token_logprobs: list[float] | None
    token_ids: list[int] | None
    finish_reason: str | None

    def __new__(cls, text: str, prompt_tokens: int | None = None,
                completion_tokens: int | None = None, token_logprobs: list[float] | None = None,
                token_ids: list[int] | None = None, finish_reason: str | None = None):
        self = super().__new__(cls, text)
        self.prompt_tokens, self.completion_tokens = prompt_tokens, completion_tokens
        self.token_logprobs, self.token_ids = token_logprobs, token_ids
        self.finish_reason = finish_reason
        return self

    @property
    def text(self) -> str:
        return str.__str__(self)

    @property
    def total_tokens(self) -> int | None:
        if self.prompt_tokens is None or self.completion_tokens is None:
            return None
        return self.prompt_tokens + self.completion_tokens


class LanguageModel(Protocol):
    """What evaluation and reasoning code needs from a model, local or remote."""

    def generate(self, prompts: list[str], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, stop: Sequence[str] = (),
                 seed: int | None = None) -> list[Completion]:
        """One completion per prompt, cut before the first stop string. With a seed, equal prompts
        in one call still get different samples (each prompt has its own stream)."""

    def score(self, contexts: list[str], continuations: list[str]) -> list[tuple[float, int]]:
        """(sum of log-probabilities, number of tokens) of each continuation given its context."""


class LocalLM:
    """`LanguageModel` over a minillm model and tokenizer, in batches of `batch_size`.
    `truncate_left=True` cuts prompts and contexts from the left to fit a model with learned
    positions (the default raises instead); `truncated` counts the texts cut so far."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 16,
                 truncate_left: bool = False):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.truncate_left, self.truncated = truncate_left, 0

    def _encode_context(self, text: str, room: int = 0) -> list[int]:
        # An empty context starts after a document separator, as documents do in training data.
        ids = self.tokenizer.encode_ordinary(text) or [self.tokenizer.eot_id]
        limit = self.model.config.block_size - room
        if self.truncate_left and self.model.wpe is not None and len(ids) > limit:
            self.truncated += 1
            ids = ids[len(ids) - max(limit, 1):]
        return ids

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        results = []
        for start in range(0, len(prompts), self.batch_size):
            batch = [self._encode_context(p, max_new_tokens - 1)
                     for p in prompts[start:start + self.batch_size]]

            def should_stop(_, new_ids):
                tail = self.tokenizer.decode(new_ids[-32:])  # a stop string spans few tokens
                return any(s in tail for s in stop)

            ids, logprobs = generate_ids(
                self.model, batch, max_new_tokens, temperature, top_k, top_p,
                seed=None if seed is None else seed + start, eos_id=self.tokenizer.eot_id,
                should_stop=should_stop if stop else None, return_logprobs=True)
            for prompt_ids, new_ids, logps in zip(batch, ids, logprobs):
                text = self.tokenizer.decode(new_ids)
                cut = min((text.find(s) for s in stop if s in text), default=len(text))
                ended = cut < len(text) or len(new_ids) < max_new_tokens
                results.append(Completion(text[:cut], len(prompt_ids), len(new_ids), logps,
                                          new_ids, "stop" if ended else "length"))
        return results

    def score(self, contexts, continuations):
        results = []
        for start in range(0, len(contexts), self.batch_size):
            cont = [self.tokenizer.encode_ordinary(x)
                    for x in continuations[start:start + self.batch_size]]
            ctx = [self._encode_context(c, len(x))
                   for c, x in zip(contexts[start:start + self.batch_size], cont)]
            for logp in continuation_logprobs(self.model, ctx, cont):
                results.append((float(logp.sum()), len(logp)))
        return results
