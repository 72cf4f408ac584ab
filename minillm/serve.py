"""Serve a minillm model over an OpenAI-compatible HTTP API, with continuous batching.

The API is the part of OpenAI's that vLLM and llama.cpp's server also speak, so the clients written
for them work unchanged (the official `openai` package, `minillm.backends.OpenAIClient`):

- `GET /v1/models`: the one served model, with its context length.
- `POST /v1/completions`: `prompt` (a string, a list of strings, or token ids), `max_tokens`
  (default 16), `temperature` (default 1; 0 is greedy), `top_p`, `top_k` (an extension vLLM also
  takes), `seed`, `n`, `stop`, `logprobs` (the chosen token's log-prob and up to 20 alternatives),
  `echo` (the prompt comes back with its tokens' log-probs: what `OpenAIClient.score` sums),
  `stream` (server-sent events; `stream_options.include_usage` adds a last chunk with the counts).
- `POST /v1/chat/completions`: `messages` rendered by `ChatTemplate`, the same sampling fields
  (`max_completion_tokens` or `max_tokens`, default: the rest of the context), `logprobs` with
  `top_logprobs`, `stream`.
- Every answer carries `usage` (prompt, completion and total tokens); completion tokens count what
  was generated, a stop string's tokens included, the end-of-text token not (as `LocalLM`).

Log-probs are under the model's own distribution (temperature 1, no top-k / top-p), as
`LocalLM`'s `Completion.token_logprobs`. Prompt text is encoded as ordinary text (a special
token's string stays text, as in `LocalLM`); an empty prompt is `<|endoftext|>`.

Requests are batched continuously (`minillm.batching`: a request joins the running batch at the
next decode step and leaves when done) and a row's result does not depend on its neighbours:
greedy rows take the argmax, sampled rows draw from their own generator seeded `seed + i` for
choice i, so a request gets what `LocalLM.generate` gives it alone.

At most `max_batch` rows run at once and `max_queue` requests wait for rows; a request beyond that
is refused at once with 503 and `Retry-After`. Bad requests get OpenAI-shaped errors,
`{"error": {"message", "type", "param", "code"}}`, with status 400 and the field in `param`.
A client that disconnects (mid-stream or while waiting) frees its rows at the next step; an error
inside the model fails the requests in the batch (500), never the server.

The HTTP layer is Starlette (routing, requests, streaming responses) under uvicorn (the HTTP
server), the optional extra `pip install -e ".[serve]"`; the scheduler and the request handling
above it need only torch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import socket
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from .batching import QueueFull, SamplingParams, Scheduler, Sequence
from .errors import UserError
from .model import GPT

try:  # the optional `serve` extra
    import uvicorn
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route
except ImportError:
    uvicorn = None

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20
MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413) before parsing


# --- the chat template ---------------------------------------------------------------------------

class ChatTemplate:
    """Chat messages -> prompt ids, and the ids that end the assistant's turn.

    chatml, when the tokenizer has the special tokens <|im_start|> and <|im_end|>:
        <|im_start|>{role}\\n{content}<|im_end|>\\n  per message, then <|im_start|>assistant\\n;
        the reply ends at <|im_end|> (or <|endoftext|>).
    plain, for any other tokenizer (minillm's own have only <|endoftext|>):
        System: {content}\\n\\n  User: {content}\\n\\n  Assistant: {content}\\n\\n  per message
        (developer counts as system), then "Assistant:"; the reply ends at <|endoftext|>, as a
        response does in minillm's SFT examples (prompt + response + <|endoftext|>).
    Message text is ordinary text: a special token's string in a message stays text, so a user
    cannot forge a turn boundary. The reply is what the model writes after the template,
    unstripped (after "Assistant:" it usually starts with a space)."""

    ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}

    def __init__(self, tokenizer, kind: str = "auto"):
        specials = tokenizer.special_tokens
        has_chatml = "<|im_start|>" in specials and "<|im_end|>" in specials
        if kind == "auto":
            kind = "chatml" if has_chatml else "plain"
        if kind not in ("chatml", "plain"):
            raise UserError(f"chat template {kind!r}: expected auto, chatml or plain")
        if kind == "chatml" and not has_chatml:
            raise UserError("the chatml chat template needs the special tokens <|im_start|> and "
                            "<|im_end|>, which this tokenizer lacks")
        self.kind, self.tokenizer = kind, tokenizer
        stop = {_eot_id(tokenizer)} - {None}
        if kind == "chatml":
            stop.add(specials["<|im_end|>"])
        if not stop:
            raise UserError("the plain chat template ends a reply at the end-of-text token, "
                            "which this tokenizer lacks")
        self.stop_ids = frozenset(stop)

    def render(self, messages: list[dict]) -> list[int]:
        """Prompt ids of `messages` ({"role", "content": str}), ending where the reply starts."""
        parts: list[str | int] = []  # text, or a special token's id
        if self.kind == "chatml":
            start, end = (self.tokenizer.special_tokens[t] for t in ("<|im_start|>", "<|im_end|>"))
            for m in messages:
                parts += [start, f"{m['role']}\n{m['content']}", end, "\n"]
            parts += [start, "assistant\n"]
        else:
            parts += [f"{self.ROLES[m['role']]}: {m['content']}\n\n" for m in messages]
            parts.append("Assistant:")
        ids: list[int] = []
        text = ""
        for part in parts + [None]:  # runs of text are encoded as one piece
            if isinstance(part, str):
                text += part
                continue
            if text:
                ids += self.tokenizer.encode_ordinary(text)
                text = ""
            if part is not None:
                ids.append(part)
        return ids


def _eot_id(tokenizer) -> int | None:
    try:
        return tokenizer.eot_id
    except KeyError:
        return None


# --- requests: validation -------------------------------------------------------------------------

class APIError(Exception):
    """A request that cannot be served: an HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _show(value) -> str:
    return json.dumps(value)[:60]


def _int(body: dict, name: str, default, lo: int | None = None, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{name} must be an integer, got {_show(value)}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = (f"between {lo} and {hi}" if hi is not None else f"at least {lo}")
        raise APIError(400, f"{name} {value}: must be {bounds}", name)
    return value


def _number(body: dict, name: str, default, lo: float, hi: float, open_lo: bool = False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a number, got {_show(value)}", name)
    if value > hi or value < lo or (open_lo and value == lo):
        bracket = "(" if open_lo else "["
        raise APIError(400, f"{name} {value}: must be in {bracket}{lo}, {hi}]", name)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {_show(value)}", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of them, got "
                            f"{_show(value)}", "stop")
    return tuple(stops)


# Fields of the OpenAI API that change what is generated and that this server does not implement:
# refused rather than silently ignored.
UNSUPPORTED = {"suffix": None, "logit_bias": None, "presence_penalty": 0, "frequency_penalty": 0,
               "tools": None, "functions": None, "tool_choice": None, "response_format": None}


@dataclass
class Job:
    """A validated request: its sequences (prompt-major, n choices each) and how to answer."""
    chat: bool
    sequences: list[Sequence]
    prompts: list[list[int]]
    prompt_texts: list[str]
    n: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    stop: tuple[str, ...]


class Engine:
    """A model behind the OpenAI API: turns request bodies into `Job`s for its `Scheduler`.
    `name` is the model name clients must send; `context_length` (default: the model's
    block_size, at most that) bounds prompt + max_tokens."""

    def __init__(self, model: GPT, tokenizer, name: str, context_length: int | None = None,
                 max_batch: int = 16, max_queue: int = 64, chat_template: str = "auto"):
        block = model.config.block_size
        self.context_length = context_length or block
        if not 1 <= self.context_length <= block:
            raise UserError(f"context length {self.context_length}: must be between 1 and the "
                            f"model's block_size {block}")
        if tokenizer.vocab_size > model.config.vocab_size:
            raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids, the model embeds only "
                            f"{model.config.vocab_size}")
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.template = ChatTemplate(tokenizer, chat_template)
        self.scheduler = Scheduler(model, tokenizer, max_batch, max_queue)
        self.eot_id = _eot_id(tokenizer)
        self.created = int(time.time())
        self.requests = 0  # accepted so far

    def start(self) -> None:
        self.scheduler.start()

    def close(self) -> None:
        self.scheduler.close()

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "minillm", "max_model_len": self.context_length}

    def _common(self, body) -> dict:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str):
            raise APIError(400, f"model must be a string naming the served model ({self.name!r})",
                           "model")
        if model != self.name:
            raise APIError(400, f"the model {model!r} does not exist; this server serves "
                                f"{self.name!r}", "model", "model_not_found")
        for name, default in UNSUPPORTED.items():
            if body.get(name, default) not in (default, [], {}):
                raise APIError(400, f"{name} is not supported by this server", name,
                               "unsupported_parameter")
        stream = _bool(body, "stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise APIError(400, "stream_options must be an object, and only with stream: true",
                           "stream_options")
        include_usage = bool(options) and _bool(options, "include_usage")
        return dict(
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
            top_k=_int(body, "top_k", None, lo=1),
            n=_int(body, "n", 1, lo=1, hi=self.scheduler.max_batch),
            seed=_int(body, "seed", None, lo=0, hi=2 ** 62),
            stop=_stop(body), stream=stream, include_usage=include_usage)

    def _check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        C = self.context_length
        if len(ids) > C or len(ids) + max_tokens > C:
            raise APIError(400, f"this model's maximum context length is {C} tokens; the "
                                f"{param} has {len(ids)} tokens and max_tokens asks for "
                                f"{max_tokens} more", param if len(ids) >= C else "max_tokens",
                           "context_length_exceeded")

    def _prompts(self, value) -> tuple[list[list[int]], list[str]]:
        """Prompt ids and texts from a string, a list of strings, token ids or lists of them."""
        def ids_of(x):
            if isinstance(x, str):
                return self.tokenizer.encode_ordinary(x) or [self.eot_id], x
            if (isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool)
                                                  and 0 <= t < self.tokenizer.vocab_size
                                                  for t in x)):
                return list(x), self.tokenizer.decode(x)
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids "
                                f"(each in [0, {self.tokenizer.vocab_size})) or a list of such "
                                f"lists; got {_show(x)}", "prompt")
        if isinstance(value, str) or (isinstance(value, list) and value
                                      and all(isinstance(t, int) for t in value)):
            pairs = [ids_of(value)]
        elif isinstance(value, list) and value:
            pairs = [ids_of(x) for x in value]
        else:
            raise APIError(400, f"prompt is missing or empty (got {_show(value)})", "prompt")
        if self.eot_id is None and any(None in ids for ids, _ in pairs):
            raise APIError(400, "empty prompt: this tokenizer has no end-of-text token to "
                                "start from", "prompt")
        return [ids for ids, _ in pairs], [text for _, text in pairs]

    def completion_job(self, body) -> Job:
        c = self._common(body)
        prompts, texts = self._prompts(body.get("prompt"))
        max_tokens = _int(body, "max_tokens", 16, lo=0)
        logprobs = _int(body, "logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        echo = _bool(body, "echo")
        best_of = body.get("best_of")
        if best_of is not None and best_of != c["n"]:
            raise APIError(400, "best_of other than n is not supported", "best_of",
                           "unsupported_parameter")
        for ids in prompts:
            self._check_length(ids, max_tokens, "prompt")
        return self._job(False, prompts, texts, c, max_tokens, logprobs, echo)

    def chat_job(self, body) -> Job:
        c = self._common(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list", "messages")
        clean = []
        for i, m in enumerate(messages):
            param = f"messages[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ChatTemplate.ROLES:
                raise APIError(400, f"{param} must be an object whose role is one of "
                                    f"{', '.join(ChatTemplate.ROLES)}", param)
            content = m.get("content")
            if isinstance(content, list):  # content parts: only text is understood
                if not all(isinstance(p, dict) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, f"{param}.content: only text parts are supported",
                                   f"{param}.content")
                content = "".join(p["text"] for p in content)
            if not isinstance(content, str):
                raise APIError(400, f"{param}.content must be a string, got {_show(content)}",
                               f"{param}.content")
            clean.append({"role": m["role"], "content": content})
        ids = self.template.render(clean)
        if len(ids) >= self.context_length:
            raise APIError(400, f"this model's maximum context length is {self.context_length} "
                                f"tokens; the messages have {len(ids)}, leaving none for a reply",
                           "messages", "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
            else "max_tokens"
        max_tokens = _int(body, name, self.context_length - len(ids), lo=0)
        self._check_length(ids, max_tokens, "messages")
        want = _bool(body, "logprobs")
        top = _int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        return self._job(True, [ids], [""], c, max_tokens, (top or 0) if want else None, False)

    def _job(self, chat, prompts, texts, c, max_tokens, logprobs, echo) -> Job:
        if len(prompts) * c["n"] > self.scheduler.max_batch:
            raise APIError(400, f"{len(prompts)} prompts x n={c['n']} choices is more than the "
                                f"{self.scheduler.max_batch} rows this server runs at once", "n")
        stop_ids = self.template.stop_ids if chat else frozenset({self.eot_id} - {None})
        params = SamplingParams(max_tokens, c["temperature"], c["top_p"], c["top_k"], c["stop"],
                                logprobs, echo)
        sequences = [Sequence(ids, params, stop_ids, None if c["seed"] is None else c["seed"] + j)
                     for ids in prompts for j in range(c["n"])]
        return Job(chat, sequences, prompts, texts, c["n"], c["stream"], c["include_usage"],
                   logprobs, echo, c["stop"])


# --- answers: text, log-probs and the OpenAI response shapes --------------------------------------

class ChoiceText:
    """The text of one choice as its tokens arrive. The final text is cut before the first stop
    string. While streaming, `ready()` holds back what might still change: a partial UTF-8
    character (decoded as U+FFFD) and an ending that could be the start of a stop string."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.tops: list[list | None] = []
        self.finish_reason: str | None = None
        self.sent_chars = self.sent_tokens = 0

    def add(self, token: int, logprob: float, top) -> None:
        self.ids.append(token)
        self.logprobs.append(logprob)
        self.tops.append(top)

    def _cut(self, text: str) -> int:
        return min((text.find(s) for s in self.stop if s in text), default=len(text))

    def final(self) -> tuple[str, int]:
        """(text cut before any stop string, number of tokens that start before the cut)."""
        text = self.tokenizer.decode(self.ids)
        cut = self._cut(text)
        if cut == len(text):
            return text, len(self.ids)
        return text[:cut], sum(offset < cut for offset in self.offsets(self.ids))

    def ready(self) -> str:
        """New text that can be streamed now."""
        text = self.tokenizer.decode(self.ids)
        end = min(self._cut(text), len(text.rstrip("\ufffd")))
        for s in self.stop:  # the longest ending that begins a stop string
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[end - k:end] == s[:k]:
                    end -= k
                    break
        new = text[self.sent_chars:end] if end > self.sent_chars else ""
        self.sent_chars += len(new)
        return new

    def rest(self) -> tuple[str, int]:
        """(final text not streamed yet, tokens not streamed yet that the final text keeps)."""
        text, kept = self.final()
        return text[self.sent_chars:], kept

    def offsets(self, ids: list[int], start: int = 0) -> list[int]:
        """Character offset at which each of `ids` starts in the decoded text (+ `start`)."""
        out, prefix = [], b""
        for t in ids:
            out.append(start + len(prefix.decode("utf-8", errors="replace")))
            prefix += self.tokenizer.token_bytes(t)
        return out

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


def completion_logprobs(tokens: list[int], logprobs: list, tops: list, offsets: list[int],
                        text_of: Callable[[int], str], k: int) -> dict:
    """The completions API's log-prob object: tokens, their log-probs, the top-k alternatives
    of each position (a dict token text -> log-prob; None where there are none) and offsets."""
    def top_dict(top):
        if top is None or k == 0:
            return None
        d: dict[str, float] = {}
        for token, lp in top:  # equal texts (cut characters): the likelier one is kept
            d.setdefault(text_of(token), lp)
        return d
    return {"tokens": [text_of(t) for t in tokens], "token_logprobs": list(logprobs),
            "top_logprobs": [top_dict(t) for t in tops], "text_offset": offsets}


def chat_logprobs(tokens: list[int], logprobs: list, tops: list, tokenizer) -> dict:
    """The chat API's log-prob object: one entry per token, with its bytes and alternatives."""
    def entry(token, lp):
        return {"token": tokenizer.decode([token]), "logprob": lp,
                "bytes": list(tokenizer.token_bytes(token))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in top or []]}
                        for t, lp, top in zip(tokens, logprobs, tops)]}


class Answer:
    """Builds the OpenAI response (or stream chunks) of one job from its sequences' events."""

    def __init__(self, engine: Engine, job: Job):
        self.engine, self.job = engine, job
        self.id = f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.texts = [ChoiceText(engine.tokenizer, job.stop) for _ in job.sequences]
        self.prompt_logprobs: list[tuple | None] = [None] * len(job.sequences)
        self.error: str | None = None

    def on_event(self, i: int, event: tuple) -> bool:
        """Record one event of choice i; True when the choice is over."""
        kind = event[0]
        if kind == "prompt":
            self.prompt_logprobs[i] = event[1:]
        elif kind == "token":
            self.texts[i].add(*event[1:])
        elif kind == "done":
            self.texts[i].finish_reason = event[1]
            return True
        elif kind == "error":
            self.error = event[1]
            return True
        return False

    def usage(self) -> dict:
        prompt = sum(len(ids) for ids in self.job.prompts)
        completion = sum(len(t.ids) for t in self.texts)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _envelope(self, choices: list[dict], chunk: bool) -> dict:
        kind = ("chat.completion" + (".chunk" if chunk else "")) if self.job.chat \
            else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created,
                "model": self.engine.name, "choices": choices}

    def _echo(self, i: int) -> tuple[str, dict | None]:
        """(prompt text, its log-prob object) for choice i of an echo request."""
        p = i // self.job.n
        ids, text = self.job.prompts[p], self.job.prompt_texts[p]
        if self.job.logprobs is None:
            return text, None
        logps, tops = self.prompt_logprobs[i]
        t = self.texts[i]
        return text, completion_logprobs(ids, logps, tops, t.offsets(ids), t.token_text,
                                         self.job.logprobs)

    def _piece_logprobs(self, i: int, first: int, last: int, start_char: int) -> dict | None:
        """Log-prob object of generated tokens [first, last) of choice i."""
        if self.job.logprobs is None:
            return None
        t = self.texts[i]
        ids, logps, tops = t.ids[first:last], t.logprobs[first:last], t.tops[first:last]
        if self.job.chat:
            return chat_logprobs(ids, logps, tops, self.engine.tokenizer)
        offsets = [start_char + o for o in t.offsets(t.ids)[first:last]]
        return completion_logprobs(ids, logps, tops, offsets, t.token_text, self.job.logprobs)

    def response(self) -> dict:
        """The whole (non-streamed) answer."""
        choices = []
        for i, t in enumerate(self.texts):
            text, kept = t.final()
            if self.job.chat:
                choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                "logprobs": self._piece_logprobs(i, 0, kept, 0),
                                "finish_reason": t.finish_reason})
                continue
            lp = self._piece_logprobs(i, 0, kept, 0)
            if self.job.echo:
                prompt_text, prompt_lp = self._echo(i)
                if lp is not None:
                    lp = self._piece_logprobs(i, 0, kept, len(prompt_text))
                    lp = {key: prompt_lp[key] + lp[key] for key in lp}
                text = prompt_text + text
            choices.append({"index": i, "text": text, "logprobs": lp,
                            "finish_reason": t.finish_reason})
        return {**self._envelope(choices, False), "usage": self.usage()}

    def _chunk_choice(self, i: int, text: str, logprobs, finish_reason, role: bool = False):
        if self.job.chat:
            delta = {"role": "assistant", "content": text} if role else \
                ({"content": text} if text else {})
            return {"index": i, "delta": delta, "logprobs": logprobs,
                    "finish_reason": finish_reason}
        return {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def chunk(self, choice: dict) -> str:
        body = self._envelope([choice], True)
        if self.job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def first_chunk(self, i: int) -> str | None:
        """The opening chunk of choice i: the chat role, or the echoed prompt."""
        if self.job.chat:
            return self.chunk(self._chunk_choice(i, "", None, None, role=True))
        if self.job.echo:
            text, lp = self._echo(i)
            return self.chunk(self._chunk_choice(i, text, lp, None))
        return None

    def progress_chunk(self, i: int) -> str | None:
        """A chunk with choice i's text that became safe to send, if any."""
        t = self.texts[i]
        new = t.ready()
        if not new:
            return None
        first, t.sent_tokens = t.sent_tokens, len(t.ids)
        start = len(self.job.prompt_texts[i // self.job.n]) if self.job.echo else 0
        return self.chunk(self._chunk_choice(
            i, new, self._piece_logprobs(i, first, len(t.ids), start), None))

    def last_chunk(self, i: int) -> str:
        t = self.texts[i]
        text, kept = t.rest()
        first = min(t.sent_tokens, kept)
        start = len(self.job.prompt_texts[i // self.job.n]) if self.job.echo else 0
        lp = self._piece_logprobs(i, first, kept, start) if kept > first else None
        return self.chunk(self._chunk_choice(i, text, lp, t.finish_reason))

    def usage_chunk(self) -> str:
        return f"data: {json.dumps({**self._envelope([], True), 'usage': self.usage()})}\n\n"


# --- the HTTP layer (Starlette under uvicorn) -----------------------------------------------------

def _error_response(e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def build_app(engine: Engine):
    """The Starlette application serving `engine`; it starts and stops the engine's scheduler
    with the server (its lifespan)."""
    if uvicorn is None:
        raise UserError('serving needs the optional packages starlette and uvicorn: '
                        'pip install -e ".[serve]"')

    async def models(request):
        return JSONResponse({"object": "list", "data": [engine.model_card()]})

    async def health(request):
        s = engine.scheduler
        return JSONResponse({"status": "ok", "running": len(s.rows), "waiting": s.waiting,
                             "requests": engine.requests})

    async def completions(request):
        return await _serve(request, engine.completion_job)

    async def chat_completions(request):
        return await _serve(request, engine.chat_job)

    async def _serve(request, make_job):
        try:
            size = int(request.headers.get("content-length") or 0)
            if size > MAX_BODY_BYTES:
                raise APIError(413, f"the request body has {size} bytes; at most {MAX_BODY_BYTES}")
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            job = make_job(body)
            answer = Answer(engine, job)
            events: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            for i, s in enumerate(job.sequences):
                s.emit = _emitter(loop, events, i)
            try:
                engine.scheduler.submit(job.sequences)
            except QueueFull as e:
                raise APIError(503, f"the server is at capacity ({e}); retry later", None,
                               "server_overloaded", "server_error", {"Retry-After": "1"}) from None
            engine.requests += 1
        except APIError as e:
            return _error_response(e)
        if job.stream:
            return StreamingResponse(_stream(answer, events), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        if not await _collect(request, answer, events):
            return JSONResponse({}, status_code=499)  # nobody is listening
        if answer.error is not None:
            return _error_response(APIError(500, answer.error, kind="server_error"))
        return JSONResponse(answer.response())

    async def http_error(request, exc):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code=str(exc.status_code)))

    async def server_error(request, exc):
        log.error("unexpected error serving %s", request.url.path, exc_info=exc)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                                        kind="server_error"))

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.close()

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={HTTPException: http_error, Exception: server_error})


def _emitter(loop, events: asyncio.Queue, i: int) -> Callable[[tuple], None]:
    """Hands the scheduler thread's events for choice i to the event loop."""
    def emit(event):
        try:
            loop.call_soon_threadsafe(events.put_nowait, (i, event))
        except RuntimeError:  # the loop is closed: nobody waits for this answer any more
            pass
    return emit


def _cancel(answer: Answer) -> None:
    for s in answer.job.sequences:
        s.cancelled = True


async def _collect(request, answer: Answer, events: asyncio.Queue) -> bool:
    """Wait for every choice to end; False (and the job cancelled) if the client disconnects."""
    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(disconnected())
    open_choices = len(answer.job.sequences)
    try:
        while open_choices:
            get = asyncio.ensure_future(events.get())
            done, _ = await asyncio.wait({get, watch}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                _cancel(answer)
                return False
            i, event = get.result()
            open_choices -= answer.on_event(i, event)
        return True
    finally:
        watch.cancel()


async def _stream(answer: Answer, events: asyncio.Queue):
    """Server-sent events: chunks as text becomes safe to send, then [DONE]. A client that
    leaves cancels this generator, which cancels the job."""
    try:
        opened = [False] * len(answer.job.sequences)
        open_choices = len(opened)
        while open_choices:
            i, event = await events.get()
            over = answer.on_event(i, event)
            if answer.error is not None:
                body = APIError(500, answer.error, kind="server_error").body()
                yield f"data: {json.dumps(body)}\n\n"
                _cancel(answer)
                return
            if not opened[i] and event[0] != "prompt":
                opened[i] = True
                first = answer.first_chunk(i)
                if first:
                    yield first
            if over:
                open_choices -= 1
                yield answer.last_chunk(i)
            elif event[0] == "token":
                chunk = answer.progress_chunk(i)
                if chunk:
                    yield chunk
        if answer.job.include_usage:
            yield answer.usage_chunk()
        yield "data: [DONE]\n\n"
    finally:
        _cancel(answer)  # a no-op for finished rows; frees the rows of a client that left


class BackgroundServer:
    """Serves `engine` on host:port from a background thread (tests, benchmarks, notebooks);
    port 0 takes a free port. `url` is the API root, http://host:port/v1. A context manager;
    `close()` stops the server and the engine's scheduler."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", start_timeout: float = 30.0):
        if uvicorn is None:
            build_app(engine)  # raises the UserError naming the extra
        sock = bind(host, port)
        self.engine, self.host, self.port = engine, host, sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        config = uvicorn.Config(build_app(engine), log_level=log_level, access_log=False,
                                timeout_graceful_shutdown=2)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]},
                                       name="minillm-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the server on {host}:{self.port} did not start")
            time.sleep(0.01)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), for uvicorn to serve on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve_forever(engine: Engine, host: str = "127.0.0.1", port: int = 8000,
                  log_level: str = "info", announce: Callable[[str], None] = print) -> None:
    """Serve `engine` in this thread until interrupted (Ctrl-C); `announce` gets the API root."""
    app = build_app(engine)
    sock = bind(host, port)
    announce(f"http://{host}:{sock.getsockname()[1]}/v1")
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
                       ).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully, then re-raises the Ctrl-C
        pass


__all__ = ["APIError", "Answer", "BackgroundServer", "ChatTemplate", "ChoiceText", "Engine", "Job",
           "bind", "build_app", "serve_forever"]
