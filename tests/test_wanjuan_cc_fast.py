"""The fast paths of the WanJuan-CC stages held to slow, obvious definitions (as the tokenizer's
fast trainer is held to a naive one): same answers on random and adversarial text."""

import re
from collections import Counter

from hypothesis import given, settings, strategies as st

from minillm.methods.wanjuan_cc import rules
from minillm.methods.wanjuan_cc.language import identify, script_shares
from minillm.methods.wanjuan_cc.safety import EMAIL, IPV4, IPV6, PHONE, mask_pii

# Words drawn from a small vocabulary so that n-grams repeat, with punctuation, digits, non-ASCII
# letters and symbols, joined by assorted whitespace.
WORDS = st.sampled_from(["the", "The", "of", "cat", "sat", "mat", "a", "1999", "3.11", "--", "...",
                         "café", "Ωmega", "²", "x_y", "(see)", "•", "¶", "日本", "ﬁne", "İs"])
SPACES = st.sampled_from([" ", " ", " ", "\n", "\t", "\n\n", "\xa0", "\u3000", "\x1c"])


@st.composite
def texts(draw):
    words = draw(st.lists(WORDS, max_size=300))
    return "".join(w + draw(SPACES) for w in words)


def slow_repeated_ngrams(text, top_max=rules.TOP_NGRAM_MAX, dup_max=rules.DUP_NGRAM_MAX):
    """Gopher's n-gram rules as first written: tuples in a Counter and a set."""
    words = [w.lower() for w in text.split()]
    total = sum(len(w) for w in words)
    if total == 0:
        return None
    for n, limit in top_max.items():
        if len(words) < n:
            continue
        grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
        gram, count = grams.most_common(1)[0]
        if count > 1 and count * sum(len(w) for w in gram) / total > limit:
            return f"top_{n}gram"
    for n, limit in dup_max.items():
        if len(words) < n:
            continue
        seen, covered = set(), [False] * len(words)
        for i in range(len(words) - n + 1):
            gram = tuple(words[i:i + n])
            if gram in seen:
                for j in range(i, i + n):
                    covered[j] = True
            seen.add(gram)
        if sum(len(w) for w, c in zip(words, covered) if c) / total > limit:
            return f"duplicate_{n}gram"
    return None


@settings(max_examples=300, deadline=None)
@given(texts(), st.floats(0.01, 0.5), st.floats(0.01, 0.5))
def test_fast_ngram_rules_equal_the_counter_version(text, top, dup):
    top_max = {2: top, 3: top * 0.9, 4: top * 0.8}
    dup_max = {5: dup, 6: dup * 0.95, 7: dup * 0.9, 8: dup * 0.85, 9: dup * 0.8, 10: dup * 0.75}
    assert rules.repeated_ngrams(text, top_max, dup_max) == slow_repeated_ngrams(text, top_max, dup_max)
    assert rules.repeated_ngrams(text) == slow_repeated_ngrams(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(texts(), st.text(max_size=400)))
def test_fast_counts_equal_their_definitions(text):
    assert rules.words_with_letters(text) == sum(any(c.isalpha() for c in w) for w in text.split())
    lines = [line for line in text.split("\n") if line.strip()]
    bullets = sum(bool(re.match(r"^\s*[\u2022\u2023\u25e6\u2043\u2219\-\*\u25aa\u25cf\u00b7]\s", line))
                  for line in lines)
    assert (rules.bullet_lines(text, 0.5) is None) == (not lines or bullets / len(lines) <= 0.5)
    ellipses = sum(line.rstrip().endswith(("...", "\u2026")) for line in lines)
    assert (rules.ellipsis_lines(text, 0.3) is None) == (not lines or ellipses / len(lines) <= 0.3)
    kept, removed = rules.clean_lines(text)
    slow = [line for line in text.split("\n")
            if not (rules.BOILERPLATE_LINE.search(line) and len(line.split()) <= 40)]
    assert kept == "\n".join(slow) and removed == text.count("\n") + 1 - len(slow)


@settings(max_examples=300, deadline=None)
@given(st.one_of(texts(), st.text(max_size=400)))
def test_language_fast_path_equals_per_character_lookup(text):
    import unicodedata
    from minillm.methods.wanjuan_cc.language import _SCRIPTS
    counts = Counter()
    for ch in text[:5000]:
        if ch.isalpha():
            name = unicodedata.name(ch, "")
            counts[next((fam for fam, keys in _SCRIPTS if name.startswith(keys)), "other")] += 1
    total = sum(counts.values())
    assert script_shares(text) == ({k: v / total for k, v in counts.items()} if total else {})
    identify(text)


PII_PIECES = st.sampled_from(["call", "+1 415-555-0132", "(020) 7946 0958", "192.168.1.20", "10.0.0.256",
                              "3.11.2", "2001:0db8:85a3:0000:0000:8a2e:0370:7334", "a:b:c", "jane@ex.org",
                              "x@y", "555 1234", "12-345-678", "@", ".", "-", "1", "12", "123", " ", "\n"])


@settings(max_examples=300, deadline=None)
@given(st.lists(PII_PIECES, max_size=40))
def test_pii_prefilters_never_change_the_result(pieces):
    text = "".join(pieces)
    expected, counts = text, {}
    for name, pattern, token in (("email", EMAIL, "<EMAIL>"), ("ip", IPV4, "<IP>"),
                                 ("ip6", IPV6, "<IP>"), ("phone", PHONE, "<PHONE>")):
        expected, counts[name] = pattern.subn(token, expected)
    counts["ip"] += counts.pop("ip6")
    assert mask_pii(text) == (expected, counts)


def test_minhash_batches_change_nothing():
    from minillm.corpus import stdlib_docstrings
    from minillm.minhash import MinHasher
    docs = [d for d in stdlib_docstrings() if len(d) > 300][:300]
    hasher = MinHasher()
    whole = hasher.signatures(docs, max_batch_chars=10**9)
    assert (hasher.signatures(docs, max_batch_chars=2000) == whole).all()
    assert (hasher.signatures(docs, max_batch_chars=1) == whole).all()  # one document a batch
