"""Continuous batching (minillm.batching) against generate_ids run on each prompt alone: rows that
join a running batch, with prompts longer or shorter than what it holds, and rows that leave it
early must not change anyone's tokens. The scheduler is stepped by hand here (no thread)."""

import pytest
import torch

from minillm.batching import QueueFull, SamplingParams, Scheduler, Sequence
from minillm.generate import generate_ids
from minillm.model import GPT, ModelConfig

CONFIGS = {
    "gpt": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32),
    "llama": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  activation="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False),
}


class Recorder:
    def __init__(self):
        self.events = []

    def __call__(self, event):
        self.events.append(event)


def sequence(prompt, max_tokens, temperature=0.0, seed=None, stop_ids=frozenset()):
    rec = Recorder()
    params = SamplingParams(max_tokens, temperature, top_k=20 if temperature else None,
                            logprobs=0)
    return Sequence(prompt, params, stop_ids, seed, rec), rec


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_rows_joining_and_leaving_mid_flight_get_their_tokens_alone(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CONFIGS[name])).eval()
    scheduler = Scheduler(model, tokenizer=None, max_batch=8)
    a, _ = sequence([5, 6, 7], 12)
    b, _ = sequence(list(range(10, 30)), 5)  # longer than the batch's columns when it joins
    c, _ = sequence([3], 9, temperature=1.0, seed=4)
    d, rec_d = sequence([40, 41], 6)
    arrivals = {0: [a], 2: [b, c], 4: [d]}  # step -> joiners
    with torch.no_grad():
        for step in range(20):
            scheduler.step(arrivals.get(step, []))
    assert not scheduler.rows and all(s.finished for s in (a, b, c, d))
    for s in (a, b, c, d):
        kw = dict(temperature=s.params.temperature, top_k=s.params.top_k)
        if s.params.temperature:
            kw["seed"] = s.seed
        alone = generate_ids(model, [s.prompt_ids], s.params.max_tokens, **kw)[0]
        assert s.new_ids == alone
    tokens = [e[1] for e in rec_d.events if e[0] == "token"]
    assert tokens == d.new_ids and rec_d.events[-1] == ("done", "length")
    assert scheduler.stats["peak_rows"] == 4 and scheduler.stats["rows_served"] == 4


def test_a_stop_token_ends_a_row_and_cancelled_rows_leave():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CONFIGS["gpt"])).eval()
    prompt = [5, 6, 7, 8, 9, 10, 11]
    free = generate_ids(model, [prompt], 10, temperature=0)[0]
    k = next(k for k in range(1, 10) if free[k] not in free[:k])  # the first new token stops
    scheduler = Scheduler(model, tokenizer=None)
    stopped, rec = sequence(prompt, 10, stop_ids=frozenset({free[k]}))
    cancelled, rec_c = sequence([1, 2], 10)
    with torch.no_grad():
        scheduler.step([stopped, cancelled])
        cancelled.cancelled = True
        for _ in range(10):
            scheduler.step([])
    assert stopped.new_ids == free[:k] and rec.events[-1] == ("done", "stop")
    assert len(cancelled.new_ids) == 1 and rec_c.events[-1][0] == "token"  # left without a word
    assert not scheduler.rows


def test_the_queue_is_bounded_and_a_request_must_fit_the_batch():
    model = GPT(ModelConfig(**CONFIGS["gpt"])).eval()
    scheduler = Scheduler(model, tokenizer=None, max_batch=2, max_queue=2)  # not started
    scheduler.submit([sequence([1], 3)[0]])
    scheduler.submit([sequence([1], 3)[0], sequence([2], 3)[0]])
    with pytest.raises(QueueFull):
        scheduler.submit([sequence([1], 3)[0]])
    with pytest.raises(ValueError, match="at most 2"):
        scheduler.submit([sequence([1], 3)[0]] * 3)
    assert scheduler.waiting == 2


def test_a_padded_embedding_never_yields_a_padding_id():
    class FiftyTokens:  # a tokenizer narrower than the model's 97-row embedding
        vocab_size = 50
    torch.manual_seed(0)
    model = GPT(ModelConfig(**CONFIGS["gpt"])).eval()
    scheduler = Scheduler(model, FiftyTokens())
    rows = [sequence([1 + i], 40, temperature=2.0, seed=i)[0] for i in range(4)]
    with torch.no_grad():
        for step in range(41):
            scheduler.step(rows if step == 0 else [])
    drawn = [t for s in rows for t in s.new_ids]
    assert len(drawn) == 160 and max(drawn) < 50
    unpadded = generate_ids(model, [[1]], 40, temperature=2.0, top_k=20, seed=0)[0]
    assert max(unpadded) >= 50  # without the cut, this model does pick padding ids
