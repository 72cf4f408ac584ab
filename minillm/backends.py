"""A `LanguageModel` over an OpenAI-compatible HTTP server (vLLM, llama.cpp's server, hosted APIs).

Standard library only (urllib, threads). `OpenAIClient(base_url, model)` speaks either endpoint:

- `api="completions"` (POST {base_url}/completions): plain text in, text out. `score` sends
  context + continuation with `echo` and `logprobs` and sums the log-probs of the tokens that
  reach into the continuation (by the tokens' character offsets); a token that straddles the
  boundary counts as the continuation's.
- `api="chat"` (POST {base_url}/chat/completions): each prompt is one user message, so the
  server applies the model's chat template. Chat answers carry no prompt log-probs: `score`
  raises `ScoringUnsupported`, as it does when a completions server ignores `echo`.

Every request is one prompt (so `usage` counts belong to it); a batch runs on at most
`max_concurrency` threads, and that limit holds across threads sharing one client. A failed request
(connection error, timeout, 408 / 409 / 429 / 5xx) is retried `max_retries` times with exponential
backoff (`backoff * 2**attempt` seconds, or the server's numeric Retry-After, at most
`max_backoff`); other non-2xx answers fail at once. Errors are `BackendError`s (a `UserError`, so
scripts print one line) that name the URL, the status and the start of the body. The API key is
read from the environment variable `api_key_env` and is never logged nor put in an error: any copy
of it in a server's body is masked.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .errors import UserError
from .generate import Completion

log = logging.getLogger(__name__)

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class BackendError(UserError):
    """A request to a model server failed: the message names the URL, status and body."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ScoringUnsupported(BackendError):
    """The backend cannot return prompt log-probabilities, which `score` needs."""


class OpenAIClient:
    """`LanguageModel` over an OpenAI-compatible server at `base_url` (e.g.
    http://127.0.0.1:8000/v1). `logprobs=True` asks for the generated tokens' log-probs."""

    def __init__(self, base_url: str, model: str, api: str = "completions",
                 api_key_env: str | None = "OPENAI_API_KEY", timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, max_backoff: float = 30.0,
                 max_concurrency: int = 8, logprobs: bool = False):
        if api not in ("completions", "chat"):
            raise UserError(f"api {api!r}: expected 'completions' or 'chat'")
        if max_concurrency < 1 or max_retries < 0 or timeout <= 0:
            raise UserError("max_concurrency must be >= 1, max_retries >= 0 and timeout > 0")
        self.base_url, self.model, self.api = base_url.rstrip("/"), model, api
        self.timeout, self.max_retries = timeout, max_retries
        self.backoff, self.max_backoff = backoff, max_backoff
        self.max_concurrency, self.logprobs = max_concurrency, logprobs
        self._api_key = os.environ.get(api_key_env) if api_key_env else None
        self._slots = threading.BoundedSemaphore(max_concurrency)

    def __repr__(self):  # the key stays out of reprs and hence out of logs
        return f"OpenAIClient({self.base_url!r}, model={self.model!r}, api={self.api!r})"

    # --- HTTP -----------------------------------------------------------------------------------

    def _mask(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _post(self, path: str, payload: dict) -> dict:
        """JSON answer of one POST, with retries; BackendError (status, body) when it fails."""
        url = self.base_url + path
        data = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            wait = min(self.backoff * 2 ** attempt, self.max_backoff)
            try:
                with self._slots:
                    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
                    with urllib.request.urlopen(request, timeout=self.timeout) as response:
                        body = response.read()
                try:
                    return json.loads(body)
                except ValueError:
                    raise BackendError(f"{url} answered {response.status} with a body that is not "
                                       f"JSON: {self._mask(body[:300].decode(errors='replace'))!r}")
            except urllib.error.HTTPError as e:
                body = self._mask(e.read()[:500].decode(errors="replace"))
                failure, status = f"{url} answered {e.code} {e.reason}: {body!r}", e.code
                if e.code not in RETRY_STATUSES:
                    raise BackendError(failure, e.code) from None
                retry_after = e.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    wait = min(float(retry_after), self.max_backoff)
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                reason, status = getattr(e, "reason", e), None
                if isinstance(reason, TimeoutError) or isinstance(e, TimeoutError):
                    failure = f"{url} timed out after {self.timeout:g} s"
                else:
                    failure = f"{url} is unreachable: {self._mask(str(reason))}"
            if attempt < self.max_retries:
                log.warning("%s; retry %d of %d in %.1f s", failure, attempt + 1,
                            self.max_retries, wait)
                time.sleep(wait)
        raise BackendError(f"{failure} (after {self.max_retries + 1} attempts)", status)

    def _map(self, fn, items: Sequence) -> list:
        if len(items) <= 1 or self.max_concurrency == 1:
            return [fn(i, x) for i, x in enumerate(items)]
        with ThreadPoolExecutor(min(self.max_concurrency, len(items))) as pool:
            return list(pool.map(fn, range(len(items)), items))

    # --- the LanguageModel interface ----------------------------------------------------------

    def generate(self, prompts, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                 stop=(), seed=None):
        def one(i: int, prompt: str) -> Completion:
            payload = {"model": self.model, "max_tokens": max_new_tokens,
                       "temperature": temperature}
            if top_p is not None:
                payload["top_p"] = top_p
            if top_k is not None:
                payload["top_k"] = top_k  # an extension that vLLM and llama.cpp accept
            if stop:
                payload["stop"] = list(stop)
            if seed is not None:
                payload["seed"] = seed + i  # equal prompts still get their own samples
            if self.api == "chat":
                payload["messages"] = [{"role": "user", "content": prompt}]
                if self.logprobs:
                    payload["logprobs"] = True
                answer = self._post("/chat/completions", payload)
            else:
                payload["prompt"] = prompt
                if self.logprobs:
                    payload["logprobs"] = 1
                answer = self._post("/completions", payload)
            return self._completion(answer)
        return self._map(one, list(prompts))

    def _completion(self, answer: dict) -> Completion:
        url = f"{self.base_url}/{'chat/' if self.api == 'chat' else ''}completions"
        try:
            choice = answer["choices"][0]
            text = choice["message"]["content"] if self.api == "chat" else choice["text"]
            if not isinstance(text, str):
                raise TypeError("text is not a string")
            usage = answer.get("usage") or {}
            logprobs = None
            if self.logprobs and choice.get("logprobs"):
                lp = choice["logprobs"]
                logprobs = ([t["logprob"] for t in lp["content"]] if self.api == "chat"
                            else [float(x) for x in lp["token_logprobs"]])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise BackendError(f"{url} answered JSON without the expected fields ({e!r}): "
                               f"{self._mask(json.dumps(answer)[:300])!r}") from None
        return Completion(text, usage.get("prompt_tokens"), usage.get("completion_tokens"),
                          logprobs, None, choice.get("finish_reason"))

    def score(self, contexts, continuations):
        if self.api == "chat":
            raise ScoringUnsupported(
                f"{self.base_url} is used through its chat endpoint, which returns no prompt "
                "log-probabilities; scoring needs a completions endpoint that honours echo and "
                "logprobs (vLLM's does): use api='completions' or judge by generated text")

        def one(_: int, pair: tuple[str, str]) -> tuple[float, int]:
            context, continuation = pair
            payload = {"model": self.model, "prompt": context + continuation, "max_tokens": 1,
                       "temperature": 0.0, "echo": True, "logprobs": 0}
            try:
                answer = self._post("/completions", payload)
            except BackendError as e:  # a server without /completions, or one refusing echo
                if e.status not in (400, 404, 405, 422, 501):
                    raise
                raise ScoringUnsupported(f"cannot score (needs /completions with echo and "
                                         f"logprobs): {e}", e.status) from None
            return self._continuation_logprob(answer, len(context), len(context + continuation))
        return self._map(one, list(zip(contexts, continuations)))

    def _continuation_logprob(self, answer: dict, start: int, end: int) -> tuple[float, int]:
        url = f"{self.base_url}/completions"
        try:
            lp = answer["choices"][0]["logprobs"]
            tokens, logps = lp["tokens"], lp["token_logprobs"]
            offsets = lp.get("text_offset")
        except (KeyError, IndexError, TypeError) as e:
            raise ScoringUnsupported(f"{url} returned no echoed prompt log-probs ({e!r}); the "
                                     "server must honour echo=True with logprobs") from None
        if offsets is None:  # offsets from the token strings
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
        total, n = 0.0, 0
        for token, logp, offset in zip(tokens, logps, offsets):
            if offset < end and offset + len(token) > start:
                if logp is None:  # only the very first prompt token has none
                    raise ScoringUnsupported(f"{url} gave no log-prob for a continuation token")
                total += float(logp)
                n += 1
        if n == 0:
            raise ScoringUnsupported(f"{url} echoed no tokens of the continuation: echo ignored?")
        return total, n


__all__ = ["BackendError", "OpenAIClient", "ScoringUnsupported"]
