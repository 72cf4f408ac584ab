"""The OpenAI-compatible client against a scripted server on 127.0.0.1 (no network)."""

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from minillm.backends import BackendError, OpenAIClient, ScoringUnsupported
from minillm.errors import UserError

KEY = "sk-test-secret-1234"


class Server:
    """Runs `handle(path, payload, headers) -> (status, body bytes or JSON-able)` in threads and
    records every request."""

    def __init__(self, handle):
        outer = self
        self.requests, self.lock = [], threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests.append((self.path, payload, dict(self.headers)))
                status, body = handle(self.path, payload, self.headers)
                if not isinstance(body, bytes):
                    body = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(handle):
        servers.append(Server(handle))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def completion(text, prompt_tokens=3, completion_tokens=2, logprobs=None):
    choice = {"text": text, "finish_reason": "stop", "logprobs": logprobs}
    return {"choices": [choice], "usage": {"prompt_tokens": prompt_tokens,
                                           "completion_tokens": completion_tokens}}


def client(url, **kw):
    kw = {"backoff": 0.01, "max_retries": 2, "timeout": 5.0, **kw}
    return OpenAIClient(url, "m", **kw)


def test_completions_text_counts_logprobs_and_request_fields(serve):
    def handle(path, payload, headers):
        assert path == "/v1/completions"
        return 200, completion(payload["prompt"].upper(), 7, 2,
                               {"tokens": ["A", "B"], "token_logprobs": [-0.5, -1.5]})
    s = serve(handle)
    outs = client(s.url, logprobs=True).generate(["ab", "cd"], max_new_tokens=5, temperature=0.7,
                                                 stop=["\n"], seed=10)
    assert outs == ["AB", "CD"]
    assert (outs[0].prompt_tokens, outs[0].completion_tokens, outs[0].total_tokens) == (7, 2, 9)
    assert outs[0].token_logprobs == [-0.5, -1.5] and outs[0].finish_reason == "stop"
    payloads = sorted((p for _, p, _ in s.requests), key=lambda p: p["prompt"])
    assert [p["seed"] for p in payloads] == [10, 11]  # equal prompts would still differ
    assert payloads[0]["max_tokens"] == 5 and payloads[0]["stop"] == ["\n"]
    assert payloads[0]["temperature"] == 0.7 and payloads[0]["logprobs"] == 1


def test_chat_endpoint_sends_one_user_message(serve):
    def handle(path, payload, headers):
        assert path == "/v1/chat/completions"
        content = payload["messages"][0]["content"]
        return 200, {"choices": [{"message": {"role": "assistant", "content": content[::-1]},
                                  "finish_reason": "length"}],
                     "usage": {"prompt_tokens": 4, "completion_tokens": 1}}
    s = serve(handle)
    (out,) = client(s.url, api="chat").generate(["abc"])
    assert out == "cba" and out.finish_reason == "length" and out.token_logprobs is None
    assert s.requests[0][1]["messages"] == [{"role": "user", "content": "abc"}]


def test_a_500_is_retried_then_succeeds(serve, caplog):
    calls = []

    def handle(path, payload, headers):
        calls.append(time.monotonic())
        return (500, {"error": "busy"}) if len(calls) < 3 else (200, completion("ok"))
    s = serve(handle)
    with caplog.at_level(logging.WARNING, logger="minillm.backends"):
        (out,) = client(s.url, backoff=0.05).generate(["x"])
    assert out == "ok" and len(calls) == 3
    assert calls[2] - calls[1] >= 0.1 - 0.01 and calls[1] - calls[0] >= 0.05 - 0.01  # backoff doubles
    assert sum("500" in r.message for r in caplog.records) == 2


def test_retries_run_out_with_status_and_body_named(serve):
    s = serve(lambda path, payload, headers: (503, b"overloaded, come back later"))
    with pytest.raises(BackendError) as e:
        client(s.url, max_retries=1).generate(["x"])
    assert "503" in str(e.value) and "overloaded, come back later" in str(e.value)
    assert "2 attempts" in str(e.value) and e.value.status == 503 and len(s.requests) == 2


def test_a_client_error_is_not_retried_and_names_status_and_body(serve):
    s = serve(lambda path, payload, headers: (400, {"error": {"message": "max_tokens too big"}}))
    with pytest.raises(BackendError, match=r"400.*max_tokens too big"):
        client(s.url).generate(["x"])
    assert len(s.requests) == 1 and issubclass(BackendError, UserError)


def test_a_timeout_is_retried_and_then_named(serve):
    def handle(path, payload, headers):
        time.sleep(0.6)
        return 200, completion("late")
    s = serve(handle)
    start = time.monotonic()
    with pytest.raises(BackendError, match=r"timed out after 0.2 s \(after 2 attempts\)"):
        client(s.url, timeout=0.2, max_retries=1).generate(["x"])
    assert time.monotonic() - start < 1.5 and len(s.requests) == 2


def test_a_malformed_body_is_a_named_error(serve):
    s = serve(lambda path, payload, headers: (200, b"<html>not json</html>"))
    with pytest.raises(BackendError, match=r"200 with a body that is not JSON: '<html>not json"):
        client(s.url).generate(["x"])
    s2 = serve(lambda path, payload, headers: (200, {"choices": []}))
    with pytest.raises(BackendError, match="without the expected fields"):
        client(s2.url).generate(["x"])


def test_score_sums_the_continuations_echoed_logprobs(serve):
    def handle(path, payload, headers):
        assert payload["echo"] is True and payload["prompt"] == "The cat sat"
        lp = {"tokens": ["The", " cat", " sat", "."], "token_logprobs": [None, -1.0, -2.0, -9.0],
              "text_offset": [0, 3, 7, 11]}  # "." is the one generated token: not scored
        return 200, completion("The cat sat.", logprobs=lp)
    s = serve(handle)
    assert client(s.url).score(["The cat"], [" sat"]) == [(-2.0, 1)]
    assert client(s.url).score(["The"], [" cat sat"]) == [(-3.0, 2)]


def test_a_chat_only_server_asked_to_score_raises_a_named_error(serve):
    def handle(path, payload, headers):
        if path != "/v1/chat/completions":
            return 404, {"error": "only /v1/chat/completions is served"}
        return 200, {"choices": [{"message": {"content": "hi"}}]}
    s = serve(handle)
    with pytest.raises(ScoringUnsupported, match="chat endpoint"):
        client(s.url, api="chat").score(["a"], ["b"])
    assert s.requests == []
    with pytest.raises(ScoringUnsupported, match=r"404.*only /v1/chat/completions"):
        client(s.url).score(["a"], ["b"])
    s2 = serve(lambda path, payload, headers: (200, completion("ab")))  # echo ignored
    with pytest.raises(ScoringUnsupported, match="echo"):
        client(s2.url).score(["a"], ["b"])


def test_concurrency_limit_holds_across_threads(serve):
    active, peak, lock = [0], [0], threading.Lock()

    def handle(path, payload, headers):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return 200, completion(payload["prompt"])
    s = serve(handle)
    lm = client(s.url, max_concurrency=3)
    results = []
    threads = [threading.Thread(target=lambda: results.append(lm.generate(list("abcdef"))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] == 3 and results[0] == list("abcdef") and len(s.requests) == 12


def test_api_key_from_env_is_sent_and_never_shown(serve, monkeypatch, caplog):
    monkeypatch.setenv("MY_KEY", KEY)
    seen = []

    def handle(path, payload, headers):
        seen.append(headers["Authorization"])
        return (500 if len(seen) == 1 else 401), {"error": f"bad key {headers['Authorization']}"}
    s = serve(handle)
    lm = client(s.url, api_key_env="MY_KEY")
    with caplog.at_level(logging.DEBUG), pytest.raises(BackendError) as e:
        lm.generate(["x"])
    assert seen == [f"Bearer {KEY}"] * 2
    assert "bad key Bearer ***" in str(e.value) and KEY not in str(e.value)
    assert caplog.records and all(KEY not in r.getMessage() for r in caplog.records)
    assert KEY not in repr(lm)
    monkeypatch.delenv("MY_KEY")
    seen.clear()
    with pytest.raises(BackendError):
        client(s.url, api_key_env="MY_KEY").generate(["x"])
    assert "Authorization" not in s.requests[-1][2]
