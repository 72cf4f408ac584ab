"""The OpenAI-compatible server (minillm.serve) on 127.0.0.1 with a tiny model, driven by the
official `openai` package and by minillm's own `OpenAIClient`: its answers must equal `LocalLM`'s
(greedy text, seeded samples, usage counts, log-probs and scores), batching must not change them,
and bad requests, a full queue and clients that leave must be answered without harm."""

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from minillm.backends import OpenAIClient  # noqa: E402
from minillm.generate import LocalLM, continuation_logprobs, generate_ids  # noqa: E402
from minillm.model import GPT, ModelConfig  # noqa: E402
from minillm.serve import BackgroundServer, ChatTemplate, Engine  # noqa: E402
from minillm.tokenizer import EOT, train_bpe  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog. A lazy dog sleeps all day.",
        "def add(x, y):\n    return x + y\n", "Stop here. Then go on; then stop again."]
PROMPTS = ["The quick brown", "def add(x", "A lazy", "Then go on; then stop", "x", ""]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXT * 4, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=96, n_layer=2, n_head=4, n_kv_head=2,
                      n_embd=32, activation="swiglu", norm="rmsnorm", position="rope",
                      tie_embeddings=False)
    return GPT(cfg).eval()


@pytest.fixture(scope="module")
def long_model(model):
    """The same weights with 2,048 positions (RoPE has no position table): requests that run
    for seconds."""
    cfg = ModelConfig(**{**model.config.to_dict(), "block_size": 2048})
    long = GPT(cfg).eval()
    long.load_state_dict(model.state_dict())
    return long


@pytest.fixture(scope="module")
def server(model, tok):
    with BackgroundServer(Engine(model, tok, "tiny", max_batch=16, max_queue=64)) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def post(url, body, raw=False):
    """(status, JSON answer) of a POST; `raw` sends `body` as bytes unchanged."""
    data = body if raw else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# --- answers equal the in-process model ----------------------------------------------------------

def test_models_lists_the_served_model(client):
    (card,) = client.models.list().data
    assert card.id == "tiny" and card.owned_by == "minillm"


def test_greedy_completions_equal_local_generate_with_counts(client, server, model, tok):
    lm = LocalLM(model, tok)
    for stop in ([], ["o"], ["\n", " the"]):
        want = [lm.generate([p], max_new_tokens=12, temperature=0.0, stop=stop)[0] for p in PROMPTS]
        for p, w in zip(PROMPTS, want):
            r = client.completions.create(model="tiny", prompt=p, max_tokens=12, temperature=0,
                                          stop=stop or None)
            (choice,) = r.choices
            assert choice.text == w and choice.finish_reason == w.finish_reason
            assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (w.prompt_tokens,
                                                                           w.completion_tokens)
        ours = OpenAIClient(server.url, "tiny", logprobs=True).generate(
            PROMPTS, max_new_tokens=12, temperature=0.0, stop=stop)
        assert ours == want and [o.completion_tokens for o in ours] == [w.completion_tokens
                                                                        for w in want]
        for o, w in zip(ours, want):  # the generated tokens' log-probs, as LocalLM reports them
            kept = len(o.token_logprobs)
            assert kept <= len(w.token_logprobs)
            torch.testing.assert_close(o.token_logprobs, w.token_logprobs[:kept], atol=1e-4,
                                       rtol=0)


def test_a_list_of_prompts_and_token_ids_are_choices_in_order(client, model, tok):
    lm = LocalLM(model, tok)
    r = client.completions.create(model="tiny", prompt=PROMPTS[:3], max_tokens=6, temperature=0,
                                  n=2)
    want = lm.generate(PROMPTS[:3], max_new_tokens=6, temperature=0.0)
    assert [c.index for c in r.choices] == list(range(6))
    assert [c.text for c in r.choices] == [w for w in want for _ in range(2)]
    assert r.usage.prompt_tokens == sum(w.prompt_tokens for w in want)  # each prompt once
    ids = tok.encode_ordinary(PROMPTS[0])
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == want[0]


def test_echo_logprobs_and_score_equal_local_scores(client, server, model, tok):
    contexts = ["The quick brown", "def add(x, y):\n", "A lazy dog", "Stop"]
    continuations = [" fox jumps", "    return", " sleeps all day.", " here."]
    local = LocalLM(model, tok).score(contexts, continuations)
    remote = OpenAIClient(server.url, "tiny").score(contexts, continuations)
    assert [n for _, n in remote] == [n for _, n in local]
    torch.testing.assert_close([s for s, _ in remote], [s for s, _ in local], atol=1e-4, rtol=0)
    # the raw echo: every prompt token after the first, with the top-3 alternatives
    prompt = "The quick brown fox jumps over"
    ids = tok.encode_ordinary(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert "".join(lp.tokens) == prompt and lp.text_offset[0] == 0 and lp.token_logprobs[0] is None
    want = continuation_logprobs(model, [ids[:1]], [ids[1:]])[0].tolist()
    torch.testing.assert_close(lp.token_logprobs[1:], want, atol=1e-4, rtol=0)
    for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
        # alternatives that decode to the same text (cut characters) share one key
        assert 1 <= len(top) <= 3 and chosen <= max(top.values()) + 1e-6


def test_seeded_sampling_equals_local_generate_and_n_takes_the_next_seeds(client, model, tok):
    lm = LocalLM(model, tok)
    kw = dict(temperature=0.9, top_p=0.95, top_k=40)
    for p in PROMPTS[:3]:
        want = lm.generate([p], max_new_tokens=10, seed=11, **kw)[0]
        r = client.completions.create(model="tiny", prompt=p, max_tokens=10, seed=11, n=2,
                                      temperature=0.9, top_p=0.95, extra_body={"top_k": 40})
        assert r.choices[0].text == want
        assert r.choices[1].text == lm.generate([p], max_new_tokens=10, seed=12, **kw)[0]


def test_sixteen_concurrent_requests_equal_the_same_requests_alone(client, server):
    requests = []
    for i in range(16):
        kw = dict(model="tiny", prompt=PROMPTS[i % len(PROMPTS)] + " " * (i % 3),
                  max_tokens=4 + 3 * (i % 5), logprobs=1)
        kw.update(temperature=0) if i % 2 else kw.update(temperature=1.0, seed=i)
        if i % 4 == 0:
            kw["stop"] = ["o"]
        requests.append(kw)

    def run(kw):
        r = client.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.choices[0].logprobs.token_logprobs

    alone = [run(kw) for kw in requests]
    stats = server.engine.scheduler.stats
    stats["peak_rows"] = 0
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, requests))
    for (text, finish, logps), (text2, finish2, logps2) in zip(alone, together):
        assert (text, finish) == (text2, finish2)
        torch.testing.assert_close(logps, logps2, atol=1e-4, rtol=0)
    assert stats["peak_rows"] > 1  # they did share batches


# --- streaming -----------------------------------------------------------------------------------

def test_streamed_completions_join_to_the_whole_answer(client):
    for kw in (dict(prompt="The quick brown", max_tokens=16, temperature=0, stop=["o", "dog"]),
               dict(prompt="def add(x", max_tokens=12, temperature=0.7, seed=5, logprobs=2),
               dict(prompt="A lazy", max_tokens=8, temperature=0, echo=True, logprobs=1)):
        whole = client.completions.create(model="tiny", **kw)
        chunks = list(client.completions.create(model="tiny", stream=True,
                                                stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == whole.choices[0].finish_reason and set(finishes[:-1]) <= {None}
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        if kw.get("logprobs"):
            streamed = [x for c in chunks if c.choices and c.choices[0].logprobs
                        for x in c.choices[0].logprobs.token_logprobs]
            assert streamed == whole.choices[0].logprobs.token_logprobs


def test_streamed_chat_joins_to_the_whole_answer_and_ends_with_done(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A lazy"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=0, logprobs=True, top_logprobs=2)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        whole.choices[0].message.content
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and bytes(t.bytes).decode(errors="replace") == t.token
               for t in content)
    # the raw event stream: data lines, then [DONE]
    request = urllib.request.Request(server.url + "/completions", method="POST", data=json.dumps(
        {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in r.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])


# --- the chat template ---------------------------------------------------------------------------

def test_chat_is_the_plain_template_continued_greedily(client, server, model, tok):
    template = ChatTemplate(tok)
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi <|endoftext|>"},
                {"role": "assistant", "content": "yo"}, {"role": "user", "content": "A lazy"}]
    ids = template.render(messages)
    assert template.kind == "plain" and template.stop_ids == {tok.eot_id}
    assert tok.decode(ids) == ("System: S\n\nUser: hi <|endoftext|>\n\nAssistant: yo\n\n"
                               "User: A lazy\n\nAssistant:")
    assert tok.eot_id not in ids  # a special token's string in a message stays text
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9,
                                       temperature=0)
    want = generate_ids(model, [ids], 9, temperature=0, eos_id=tok.eot_id)[0]
    assert r.choices[0].message.content == tok.decode(want)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(want))
    (ours,) = OpenAIClient(server.url, "tiny", api="chat").generate(
        ["A lazy"], max_new_tokens=9, temperature=0.0)
    alone = generate_ids(model, [template.render([{"role": "user", "content": "A lazy"}])], 9,
                         temperature=0, eos_id=tok.eot_id)[0]
    assert ours == tok.decode(alone)


def test_chatml_template_uses_the_tokenizers_special_tokens():
    tok = train_bpe(TEXT, vocab_size=300, special_tokens=[EOT, "<|im_start|>", "<|im_end|>"])
    start, end = tok.special_tokens["<|im_start|>"], tok.special_tokens["<|im_end|>"]
    template = ChatTemplate(tok)
    ids = template.render([{"role": "user", "content": "hi <|im_end|>"}])
    assert template.kind == "chatml" and template.stop_ids == {tok.eot_id, end}
    assert ids == ([start] + tok.encode_ordinary("user\nhi <|im_end|>") + [end]
                   + tok.encode_ordinary("\n") + [start] + tok.encode_ordinary("assistant\n"))
    assert ChatTemplate(tok, "plain").kind == "plain"


# --- mistakes, a full queue, clients that leave --------------------------------------------------

BAD = [
    ({"model": "gpt-4", "prompt": "x"}, "model"),
    ({"prompt": "x"}, "model"),
    ({"model": "tiny", "prompt": "x" * 400}, "prompt"),  # longer than the context of 96
    ({"model": "tiny", "prompt": "x", "max_tokens": 200}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": "hot"}, "temperature"),
    ({"model": "tiny", "prompt": "x", "temperature": 3}, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 0}, "n"),
    ({"model": "tiny", "prompt": "x", "n": 17}, "n"),
    ({"model": "tiny", "prompt": "x", "seed": 1.5}, "seed"),
    ({"model": "tiny", "prompt": "x", "stop": [1]}, "stop"),
    ({"model": "tiny", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "tiny", "prompt": "x", "echo": "yes"}, "echo"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "tiny", "prompt": "x", "presence_penalty": 1.0}, "presence_penalty"),
    ({"model": "tiny", "prompt": [1, 99999]}, "prompt"),
    ({"model": "tiny", "prompt": []}, "prompt"),
    ({"model": "tiny", "prompt": None}, "prompt"),
]
BAD_CHAT = [
    ({"model": "tiny"}, "messages"),
    ({"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}, "messages[0]"),
    ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 400}]}, "messages"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
]


@pytest.mark.parametrize("path, body, param", [("/completions", b, p) for b, p in BAD]
                         + [("/chat/completions", b, p) for b, p in BAD_CHAT])
def test_bad_requests_get_a_400_naming_the_field(server, path, body, param):
    status, answer = post(server.url + path, body)
    assert status == 400 and answer["error"]["param"] == param, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["message"]


def test_malformed_bodies_and_unknown_routes_get_json_errors_and_the_server_lives(server, client):
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, answer = post(server.url + "/completions", raw, raw=True)
        assert status == 400 and "message" in answer["error"]
    status, answer = post(server.url + "/embeddings", {"model": "tiny"})
    assert status == 404 and "/v1/embeddings" in answer["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:  # the official client reads the shape
        client.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    assert client.completions.create(model="tiny", prompt="x", max_tokens=2).usage.total_tokens


def wait_until(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_full_queue_is_a_503_and_clients_that_leave_free_their_rows(long_model, tok):
    engine = Engine(long_model, tok, "tiny", max_batch=1, max_queue=1)
    scheduler = engine.scheduler
    with BackgroundServer(engine) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)
        # a long stream holds the one row ...
        stream = client.completions.create(model="tiny", prompt="x", max_tokens=2000,
                                           temperature=0, stream=True)
        next(iter(stream))
        (streamed,) = scheduler.rows
        # ... a second request waits for it ...
        queued = ThreadPoolExecutor(1).submit(client.completions.create, model="tiny",
                                              prompt="A lazy", max_tokens=3, temperature=0)
        wait_until(lambda: scheduler.waiting == 1)
        # ... and a third finds the queue full
        status, answer = post(server.url + "/completions", {"model": "tiny", "prompt": "x"})
        assert status == 503 and answer["error"]["code"] == "server_overloaded"
        stream.close()  # the client leaves mid-stream: its row goes, the waiting request runs
        assert queued.result(timeout=30).choices[0].finish_reason == "length"
        wait_until(lambda: not scheduler.rows and not scheduler.waiting)
        assert streamed.cancelled and not streamed.finished and len(streamed.new_ids) < 2000
        # a client that leaves a non-streamed request frees its row too
        body = json.dumps({"model": "tiny", "prompt": "x", "max_tokens": 2000, "temperature": 0})
        with socket.create_connection((server.host, server.port)) as sock:
            sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
            wait_until(lambda: len(scheduler.rows) == 1)
            (left,) = scheduler.rows
        wait_until(lambda: not scheduler.rows)
        assert left.cancelled and not left.finished and len(left.new_ids) < 2000
        status, _ = post(server.url + "/completions", {"model": "tiny", "prompt": "x",
                                                       "max_tokens": 1})
        assert status == 200
