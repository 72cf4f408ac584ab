import base64
import json

import pytest
from hypothesis import given, strategies as st

from minillm.corpus import stdlib_docstrings
from minillm.tokenizer import (EOT, GPT2_PATTERN, GPT4_PATTERN, Tokenizer, count_words,
                               train_bpe)


@pytest.fixture(scope="module")
def corpus():
    return list(stdlib_docstrings(max_files=25))


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(corpus, vocab_size=600)


def naive_bpe_vocab(texts, vocab_size, pattern):
    """Reference trainer: recount every pair over every word before each merge."""
    counts = count_words(texts, pattern)
    words = {w: [bytes([b]) for b in w.encode()] for w in counts}
    vocab = [bytes([i]) for i in range(256)]
    while len(vocab) < vocab_size - 1:
        pairs = {}
        for w, toks in words.items():
            for p in zip(toks, toks[1:]):
                pairs[p] = pairs.get(p, 0) + counts[w]
        if not pairs:
            break
        ids = {b: i for i, b in enumerate(vocab)}
        # Same tie-break as train_bpe: highest count, then smallest (id_a, id_b).
        best = min(pairs, key=lambda p: (-pairs[p], ids[p[0]], ids[p[1]]))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        if merged not in ids:
            vocab.append(merged)
        for w, toks in words.items():
            out, i = [], 0
            while i < len(toks):
                if i + 1 < len(toks) and (toks[i], toks[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(toks[i])
                    i += 1
            words[w] = out
    return vocab


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT4_PATTERN])
def test_incremental_training_equals_naive_recount(corpus, pattern):
    texts = corpus[:40]
    tok = train_bpe(texts, vocab_size=400, pattern=pattern)
    by_rank = sorted(tok.mergeable_ranks, key=tok.mergeable_ranks.get)
    assert by_rank == naive_bpe_vocab(texts, 400, pattern)


def test_training_is_deterministic(corpus, tok):
    again = train_bpe(corpus, vocab_size=600)
    assert again.mergeable_ranks == tok.mergeable_ranks
    assert again.special_tokens == tok.special_tokens


def test_vocab_layout_and_compression(corpus, tok):
    assert tok.vocab_size == 600
    assert tok.eot_id == 599
    assert len(tok.mergeable_ranks) == 599
    text = "\n".join(corpus)
    # Learned merges must compress the training text well beyond one byte per token.
    assert len(text.encode()) / len(tok.encode_ordinary(text)) > 2.0


@given(st.text())
def test_roundtrip_any_unicode(tok, s):
    assert tok.decode(tok.encode_ordinary(s)) == s
    assert tok.decode(tok.encode(s.replace(EOT, ""))) == s.replace(EOT, "")


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=50))
def test_roundtrip_gpt2_pattern(s):
    tok = train_bpe(["hello world, hello there! 123 4567"] * 3, vocab_size=280, pattern=GPT2_PATTERN)
    assert tok.decode(tok.encode_ordinary(s)) == s


def test_special_tokens_refused_unless_allowed(tok):
    text = f"one document{EOT}another"
    with pytest.raises(ValueError):
        tok.encode(text)
    assert tok.eot_id in tok.encode(text, allowed_special={EOT})
    assert tok.eot_id in tok.encode(text, allowed_special="all")
    # As plain text the special string is ordinary bytes, never the special id.
    assert tok.eot_id not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text


def test_special_tokens_are_cut_out_of_training_text():
    tok = train_bpe([f"alpha{EOT}beta{EOT}" * 50], vocab_size=300)
    assert not any(b"endoftext" in t or b"|>" in t for t in tok.mergeable_ranks)


def test_extra_special_tokens_get_the_last_ids():
    tok = train_bpe(["some text to train on"] * 5, vocab_size=270,
                    special_tokens=[EOT, "<|user|>", "<|assistant|>"])
    assert tok.special_tokens == {EOT: 267, "<|user|>": 268, "<|assistant|>": 269}
    assert tok.encode("<|user|>hi", allowed_special="all")[0] == 268


def test_vocab_too_small_is_refused():
    with pytest.raises(ValueError, match="smaller than 256"):
        train_bpe(["x"], vocab_size=256)


def test_small_corpus_stops_early_without_error():
    tok = train_bpe(["ab ab"], vocab_size=1000)
    assert tok.vocab_size < 1000
    assert tok.decode(tok.encode("ab ab")) == "ab ab"


def test_save_load_roundtrip(tmp_path, tok, corpus):
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens
    assert loaded.pattern == tok.pattern
    assert loaded.encode_ordinary(corpus[0]) == tok.encode_ordinary(corpus[0])
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors_name_the_file(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json.*invalid JSON"):
        Tokenizer.load(bad)
    bad.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match="bad.json.*not a minillm tokenizer"):
        Tokenizer.load(bad)
    d = tok.to_dict()
    del d["ranks"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="missing field 'ranks'"):
        Tokenizer.load(bad)


def test_tiktoken_rank_file(tmp_path, tok, corpus):
    path = tmp_path / "mini.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n"
                            for t, r in tok.mergeable_ranks.items()))
    loaded = Tokenizer.from_tiktoken_file(path, pattern=tok.pattern)
    assert loaded.eot_id == tok.eot_id
    assert loaded.encode_ordinary(corpus[1]) == tok.encode_ordinary(corpus[1])
