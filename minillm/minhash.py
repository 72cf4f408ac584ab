"""MinHash signatures, LSH banding and union-find (WanJuan-CC stage 5, fuzzy deduplication).

A document's shingles are its word 5-grams (lower-cased runs of ASCII letters and digits or
non-ASCII characters; `exact_jaccard` uses the same words). MinHash estimates the
Jaccard similarity of two shingle sets as the share of equal entries in their signatures: entry p is
the minimum over shingles of a random hash h_p. All of it is vectorised over a batch of documents:

1. Word hashes without a Python loop over words: the batch is one byte string, and a word's hash is
   a polynomial hash of its bytes, read off prefix sums (h(s..e) = (H[e] - H[s]) * P^-s mod 2^64,
   P odd so that P^-1 exists modulo 2^64).
2. A 5-gram's hash combines five consecutive word hashes; 5-grams that would cross a document
   boundary are dropped (a document shorter than 5 words is one shingle of all its words).
3. Shingle hashes are mixed to 32 bits; permutation p is h_p(x) = a_p * x + b_p mod 2^32 (a_p odd:
   a bijection of 32-bit values), and `np.minimum.reduceat` takes each document's minimum.

LSH: the signature is cut into b bands of r rows; two documents become a candidate pair when a whole
band agrees, which happens with probability 1 - (1 - J^r)^b. `lsh_params` picks the largest r whose
candidate probability at the *verification* threshold is still >= 0.99, because banding exactly at
the target threshold finds only about half of the pairs just above it.
"""

from __future__ import annotations

import re

import numpy as np

_WORD_RUN = re.compile(rb"[a-zA-Z0-9\x80-\xfe]+")
# bytes that belong to words: ASCII letters and digits, and every non-ASCII byte except 0xFF
_WORD_BYTE = np.zeros(256, dtype=bool)
_WORD_BYTE[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1), *range(ord("0"), ord("9") + 1),
            *range(0x80, 0xFF)]] = True
_P = np.uint64(0x100000001B3)  # odd multiplier for the byte-level polynomial hash
_Q = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining word hashes into n-gram hashes
_MIX = np.uint64(0xBF58476D1CE4E5B9)


def _inverse_mod_2_64(a: int) -> int:
    return pow(a, -1, 2**64)


_P_INV = np.uint64(_inverse_mod_2_64(int(_P)))


def _powers(base: np.uint64, n: int) -> np.ndarray:
    """base^0 .. base^(n-1) modulo 2^64."""
    out = np.full(n, base, dtype=np.uint64)
    out[0] = 1
    with np.errstate(over="ignore"):
        return np.cumprod(out, dtype=np.uint64)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of arange(s, s + c) for each (s, c), without a Python loop."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    shift = np.repeat(starts.astype(np.int64) - (np.cumsum(counts) - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


class MinHasher:
    """Signatures of `num_perm` entries (uint32) over word `ngram`-shingles, seeded."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.num_perm, self.ngram = num_perm, ngram
        self.a = (rng.integers(0, 2**32, num_perm, dtype=np.uint64) | 1).astype(np.uint32)[:, None]
        self.b = rng.integers(0, 2**32, num_perm, dtype=np.uint64).astype(np.uint32)[:, None]
        self._q_powers = _powers(_Q, ngram)
        self._pow = self._inv = np.zeros(0, dtype=np.uint64)

    def _power_tables(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """P^i and P^-i for i < n (mod 2^64), cached across batches."""
        if len(self._pow) < n:
            size = max(n, 2 * len(self._pow))
            self._pow, self._inv = _powers(_P, size), _powers(_P_INV, size)
        return self._pow, self._inv

    def shingle_hashes(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(uint32 shingle hashes of all documents, start offset of each document's run)."""
        # One byte string for the batch; 0xFF (never part of UTF-8) separates documents. Words are
        # runs of ASCII letters / digits or non-ASCII bytes (so "café" is one word).
        buf = np.frombuffer(b"\xff".join(t.lower().encode("utf-8", "replace") for t in texts) + b"\xff",
                            dtype=np.uint8)
        in_word = _WORD_BYTE[buf].astype(np.int8)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], in_word, [0]])))
        starts, ends = edges[0::2], edges[1::2]
        powers, inverse = self._power_tables(len(buf) + 1)
        with np.errstate(over="ignore"):
            prefix = np.concatenate([[np.uint64(0)],
                                     np.cumsum(buf.astype(np.uint64) * powers[:len(buf)], dtype=np.uint64)])
            word_h = (prefix[ends] - prefix[starts]) * inverse[starts]
        doc_of_word = np.searchsorted(np.flatnonzero(buf == 0xFF), starts)
        words_per_doc = np.bincount(doc_of_word, minlength=len(texts))
        first_word = np.concatenate([[0], np.cumsum(words_per_doc)[:-1]]).astype(np.int64)
        n = self.ngram
        with np.errstate(over="ignore"):
            gram = np.zeros(max(len(word_h) - n + 1, 0), dtype=np.uint64)
            for k in range(n):  # n-gram starting at word i: sum_k word_h[i + k] * Q^k
                gram += word_h[k:len(word_h) - n + 1 + k] * self._q_powers[k]
        grams_per_doc = np.maximum(words_per_doc - n + 1, 0)
        short = np.flatnonzero(words_per_doc < n)  # one shingle of all their words
        per_doc = grams_per_doc.copy()
        per_doc[short] = 1
        offsets = np.concatenate([[0], np.cumsum(per_doc)[:-1]]).astype(np.int64)
        hashes = np.empty(int(per_doc.sum()), dtype=np.uint64)
        long_docs = np.flatnonzero(words_per_doc >= n)
        hashes[_ranges(offsets[long_docs], grams_per_doc[long_docs])] = \
            gram[_ranges(first_word[long_docs], grams_per_doc[long_docs])]
        with np.errstate(over="ignore"):
            for d in short:  # rare: documents of fewer than n words
                s, c = first_word[d], words_per_doc[d]
                hashes[offsets[d]] = np.sum(word_h[s:s + c] * self._q_powers[:c], dtype=np.uint64)
            mixed = hashes * _MIX
        return (mixed >> np.uint64(32)).astype(np.uint32), offsets

    def signatures(self, texts: list[str], max_cells: int = 2**20, max_batch_chars: int = 1 << 21) -> np.ndarray:
        """(len(texts), num_perm) uint32 MinHash signatures, in batches of about `max_batch_chars`
        characters (the power tables of the prefix-sum hash grow with the batch, and stay cached)."""
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        start = 0
        while start < len(texts):
            end, size = start + 1, len(texts[start])
            while end < len(texts) and size + len(texts[end]) <= max_batch_chars:
                size += len(texts[end])
                end += 1
            out[start:end] = self._batch_signatures(texts[start:end], max_cells)
            start = end
        return out

    def _batch_signatures(self, texts: list[str], max_cells: int) -> np.ndarray:
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        hashes, offsets = self.shingle_hashes(texts)
        bounds = np.concatenate([offsets, [len(hashes)]])
        doc = 0
        while doc < len(texts):  # a slice of documents whose permuted values fit in max_cells
            end = int(np.searchsorted(bounds, bounds[doc] + max_cells // self.num_perm, side="right")) - 1
            end = min(max(end, doc + 1), len(texts))
            lo, hi = bounds[doc], bounds[end]
            with np.errstate(over="ignore"):
                permuted = self.a * hashes[lo:hi][None, :] + self.b  # (num_perm, shingles)
            out[doc:end] = np.minimum.reduceat(permuted, offsets[doc:end] - lo, axis=1).T
            doc = end
        return out


def jaccard_estimate(sig_a: np.ndarray, sig_b: np.ndarray) -> np.ndarray:
    """Share of equal signature entries (rows of equal-shape arrays)."""
    return (sig_a == sig_b).mean(axis=-1)


def words(text: str) -> list[bytes]:
    """The words shingles are made of (as in `MinHasher.shingle_hashes`)."""
    return _WORD_RUN.findall(text.lower().encode("utf-8", "replace"))


def exact_jaccard(text_a: str, text_b: str, ngram: int = 5) -> float:
    """Jaccard similarity of the word n-gram sets (the quantity MinHash estimates)."""
    def grams(t):
        w = words(t)
        return {tuple(w[i:i + ngram]) for i in range(len(w) - ngram + 1)} or {tuple(w)}
    a, b = grams(text_a), grams(text_b)
    return len(a & b) / len(a | b)


def candidate_probability(j: float, bands: int, rows: int) -> float:
    return 1 - (1 - j ** rows) ** bands


def lsh_params(num_perm: int, verify_threshold: float, min_probability: float = 0.99) -> tuple[int, int]:
    """(bands, rows): the largest `rows` such that a pair at `verify_threshold` is still a candidate
    with probability >= `min_probability` (larger rows -> fewer spurious candidates)."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if candidate_probability(verify_threshold, bands, rows) >= min_probability:
            best = (bands, rows)
    return best


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(documents, bands) uint64 hash of each band's rows."""
    sig = signatures[:, :bands * rows].astype(np.uint64).reshape(len(signatures), bands, rows)
    h = np.zeros((len(signatures), bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(rows):
            h = h * _Q + sig[:, :, k] + np.uint64(k + 1)
    return h


class UnionFind:
    """Disjoint sets over arbitrary hashable ids; `find` compresses paths."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        parent = self.parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while x != root:
            parent[x], x = root, parent.get(x, x)
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            if rb < ra:
                ra, rb = rb, ra
            self.parent[rb] = ra  # the smaller id becomes the root: the one kept
