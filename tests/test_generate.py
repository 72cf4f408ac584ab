import pytest
import torch

from minillm.generate import LocalLM, continuation_logprobs, generate_ids, sample_next
from minillm.model import GPT, ModelConfig
from minillm.tokenizer import train_bpe

CONFIGS = {
    "gpt": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_embd=32),
    "llama": dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                  activation="swiglu", norm="rmsnorm", position="rope", tie_embeddings=False),
}


def make(name, **kw):
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**CONFIGS[name], **kw})).eval()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_logits_equal_full_recomputation(name):
    model = make(name)
    x = torch.randint(0, 97, (3, 20))
    full = model(x).logits
    cache = model.new_kv_cache(3, 20)
    pieces = [model(x[:, :8], kv_cache=cache).logits]
    for t in range(8, 20):
        pieces.append(model(x[:, t:t + 1], kv_cache=cache).logits)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cached_generation_equals_uncached(name):
    model = make(name)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    for kw in (dict(temperature=0), dict(temperature=1.0, top_k=20, seed=3)):
        cached = generate_ids(model, prompts, 12, **kw)
        uncached = generate_ids(model, prompts, 12, use_cache=False, **kw)
        assert cached == uncached and all(len(r) == 12 for r in cached)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_batch_of_different_lengths_equals_each_prompt_alone(name):
    model = make(name)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22]]
    batched = generate_ids(model, prompts, 10, temperature=0)
    alone = [generate_ids(model, [p], 10, temperature=0)[0] for p in prompts]
    assert batched == alone


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {3, 4}
    probs = logits[0].softmax(-1)  # 0.64 for 4, 0.24 for 3: top_p=0.7 keeps exactly {3, 4}
    assert probs[4] < 0.7 < probs[4] + probs[3]
    assert set(sample_next(logits, top_p=0.7, generator=g).tolist()) == {3, 4}
    assert set(sample_next(logits, top_p=0.5, generator=g).tolist()) == {4}
    assert (sample_next(logits, temperature=0) == 4).all()
    freq = torch.bincount(sample_next(logits, generator=g), minlength=5) / 2000
    assert torch.allclose(freq, probs, atol=0.04)


def test_eos_and_stop_end_rows_and_seed_repeats():
    model = make("gpt")
    prompts = [[1, 2], [3, 4]]
    free = generate_ids(model, prompts, 10, temperature=0)
    eos = free[0][3]
    stopped = generate_ids(model, prompts, 10, temperature=0, eos_id=eos)
    assert stopped[0] == free[0][:free[0].index(eos)]
    cut = generate_ids(model, prompts, 10, temperature=0, should_stop=lambda b, ids: len(ids) == 2)
    assert cut == [free[0][:2], free[1][:2]]
    a = generate_ids(model, prompts, 8, temperature=1.0, seed=7)
    assert a == generate_ids(model, prompts, 8, temperature=1.0, seed=7)


def test_scores_equal_full_sequence_logits():
    model = make("llama")
    contexts, conts = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]]
    got = continuation_logprobs(model, contexts, conts)
    for c, x, lp in zip(contexts, conts, got):
        seq = torch.tensor([c + x])
        logp = model(seq).logits.log_softmax(-1)[0]
        expected = torch.stack([logp[len(c) - 1 + i, t] for i, t in enumerate(x)])
        torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scores_through_an_embedding_function_equal_the_id_path(name):
    model = make(name)
    contexts, conts = [[1, 2, 3], [4]], [[5, 6], [7, 8, 9, 10]]
    plain = continuation_logprobs(model, contexts, conts)
    # the model's own lookup as the embedding function: the same numbers, bit for bit
    for a, b in zip(plain, continuation_logprobs(model, contexts, conts, embed=model.wte)):
        assert torch.equal(a, b)
    # one row's embedding at position 1 replaced: row 0 scores as the unpadded sequence with that
    # embedding, row 1 (whose context is the single token at 0) is untouched
    vector_d = torch.randn(model.config.n_embd)

    def embed(ids_BT):
        x_BTd = model.wte(ids_BT).clone()
        x_BTd[0, 1] = vector_d
        return x_BTd

    got = continuation_logprobs(model, contexts, conts, embed=embed)
    x_1Td = model.wte(torch.tensor([contexts[0] + conts[0]])).clone()
    x_1Td[0, 1] = vector_d
    logp = model(inputs_embeds=x_1Td).logits.log_softmax(-1)[0]
    expected = torch.stack([logp[len(contexts[0]) - 1 + i, t] for i, t in enumerate(conts[0])])
    torch.testing.assert_close(got[0], expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], plain[0])
    torch.testing.assert_close(got[1], plain[1], atol=1e-6, rtol=1e-6)

def test_local_lm_generates_text_and_cuts_at_stop_strings():
    tok = train_bpe(["the cat sat on the mat. the dog sat on the log."] * 5, vocab_size=300)
    model = make("gpt", vocab_size=tok.vocab_size)
    lm = LocalLM(model, tok, batch_size=2)
    full = lm.generate(["the cat", "the dog", ""], max_new_tokens=12)
    assert len(full) == 3
    stop = full[0][2:4]
    assert stop and all(stop not in t for t in lm.generate(["the cat"], 12, stop=[stop]))
    (logp, n), = lm.score(["the cat"], [" sat"])
    assert n == len(tok.encode_ordinary(" sat")) and logp < 0


def test_completions_carry_token_counts_and_the_models_logprobs():
    tok = train_bpe(["the cat sat on the mat. the dog sat on the log."] * 5, vocab_size=300)
    model = make("gpt", vocab_size=tok.vocab_size)
    lm = LocalLM(model, tok)
    (out,) = lm.generate(["the cat"], max_new_tokens=6, temperature=1.0, top_k=5, seed=1)
    assert isinstance(out, str) and out.text == str(out)
    assert out.prompt_tokens == len(tok.encode_ordinary("the cat"))
    assert out.completion_tokens == len(out.token_ids) == len(out.token_logprobs) == 6
    assert out.finish_reason == "length" and out.total_tokens == out.prompt_tokens + 6
    # the returned log-probs are the model's own (temperature 1, unfiltered), as the scorer sees them
    (expected,) = continuation_logprobs(model, [tok.encode_ordinary("the cat")], [out.token_ids])
    torch.testing.assert_close(torch.tensor(out.token_logprobs), expected, atol=1e-4, rtol=1e-4)


def test_equal_prompts_with_one_seed_get_different_samples_and_a_stop_ends_with_stop():
    tok = train_bpe(["the cat sat on the mat. the dog sat on the log."] * 5, vocab_size=300)
    lm = LocalLM(make("gpt", vocab_size=tok.vocab_size), tok)
    a, b = lm.generate(["the cat"] * 2, max_new_tokens=8, temperature=1.0, seed=0)
    assert a.token_ids != b.token_ids
    free = lm.generate(["the dog"], 12)[0]
    stop = free[2:4]
    (cut,) = lm.generate(["the dog"], 12, stop=[stop])
    assert cut.finish_reason == "stop" and stop not in cut and cut.completion_tokens <= 12


def test_truncate_left_fits_long_prompts_into_learned_positions():
    tok = train_bpe(["the cat sat on the mat. the dog sat on the log."] * 5, vocab_size=300)
    model = make("gpt", vocab_size=tok.vocab_size, block_size=16)
    long = "the cat sat on the mat. " * 10
    with pytest.raises(ValueError):
        LocalLM(model, tok).generate([long], 4)
    lm = LocalLM(model, tok, truncate_left=True)
    (out,) = lm.generate([long], 4)
    assert out.prompt_tokens == 13 and lm.truncated == 1
    room = 16 - len(tok.encode_ordinary(" mat"))
    tail_ids = tok.encode_ordinary(long)[-room:]
    assert tok.encode_ordinary(tok.decode(tail_ids)) == tail_ids
    assert lm.score([long], [" mat"]) == LocalLM(model, tok).score([tok.decode(tail_ids)], [" mat"])
