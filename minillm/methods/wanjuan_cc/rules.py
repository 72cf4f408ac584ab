"""Heuristic quality rules (WanJuan-CC stage 4), in the Gopher (Rae et al. 2021) and C4 (Raffel et
al. 2020) family. The paper leaves exact thresholds open; defaults here are Gopher's and C4's.

Line-level cleaning runs first (`clean_lines`: drops boilerplate lines such as "enable javascript"
or cookie notices, C4 style). Then every document-level rule is a named function
`rule(text, ...thresholds) -> None | reason` that returns None to keep the document. `RuleSet`
applies them in order with the thresholds as fields and returns the first reason a document fails.

Speed: a rule takes a `str` or a `Doc`, which computes the words and lines once for all rules.
Counts come from regular expressions, `str.split` and `str.isalpha` (in C) rather than Python
loops over characters, and the n-gram rules hash word ids in numpy instead of counting tuples.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

_BULLET_LINE = re.compile(r"^[^\S\n]*[\u2022\u2023\u25e6\u2043\u2219\-\*\u25aa\u25cf\u00b7][^\S\n]", re.M)
_ELLIPSIS_LINE = re.compile(r"(?:\.\.\.|\u2026)[^\S\n]*$", re.M)
_LETTERS = "[^\\W\\d_]"  # a letter, in a character class of the re module
GOPHER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
BOILERPLATE_LINE = re.compile(
    r"javascript|cookie|terms of use|privacy policy|all rights reserved|sign up for our newsletter"
    r"|log ?in to continue|click here to|accept all",
    re.I)
_BOILERPLATE_LOWER = re.compile(BOILERPLATE_LINE.pattern)
LOREM = re.compile(r"lorem ipsum", re.I)
_Q = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier combining word hashes into n-gram hashes


class Doc:
    """A text and what several rules need of it, each computed once on first use."""

    def __init__(self, text: str):
        self.text = text

    @functools.cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @functools.cached_property
    def lines(self) -> list[str]:
        """Non-blank lines, stripped."""
        return [s for s in (line.strip() for line in self.text.split("\n")) if s]

    @functools.cached_property
    def word_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """(a uint64 hash of each lower-cased word, each word's length)."""
        lower = self.text.lower().split()
        ids = np.fromiter(map(hash, lower), dtype=np.int64, count=len(lower)).view(np.uint64)
        return ids, np.fromiter(map(len, lower), dtype=np.int64, count=len(lower))


def as_doc(text: str | Doc) -> Doc:
    return text if isinstance(text, Doc) else Doc(text)


def words_of(text: str) -> list[str]:
    return text.split()


# --- line-level cleaning ---------------------------------------------------------------------------

def clean_lines(text: str, pattern: re.Pattern = BOILERPLATE_LINE, max_line_words: int = 40) -> tuple[str, int]:
    """Drop boilerplate lines (matching `pattern`) that are short (a long paragraph that mentions
    cookies is prose, not a notice). Returns (text, lines removed)."""
    lines = None
    if pattern is BOILERPLATE_LINE:  # one case-sensitive pass over the lower-cased text is 3x faster
        lowered = text.lower()
        if len(lowered) == len(text):  # positions agree (lower() kept every character's length)
            spans = {(text.rfind("\n", 0, m.start()) + 1, text.find("\n", m.end()))
                     for m in _BOILERPLATE_LOWER.finditer(lowered)}
            lines = {text[a:b if b >= 0 else len(text)] for a, b in spans}
    kept, removed = [], 0
    if lines is not None and not lines:
        return text, 0
    for line in text.split("\n"):
        if (line in lines if lines is not None else pattern.search(line)) and len(line.split()) <= max_line_words:
            removed += 1
        else:
            kept.append(line)
    return "\n".join(kept), removed


# --- document rules ---------------------------------------------------------------------------------

def word_count(text: str | Doc, min_words: int = 50, max_words: int = 100_000) -> str | None:
    n = len(as_doc(text).words)
    return None if min_words <= n <= max_words else f"word_count:{'low' if n < min_words else 'high'}"


def mean_word_length(text: str | Doc, low: float = 3.0, high: float = 10.0) -> str | None:
    words = as_doc(text).words
    if not words:
        return "mean_word_length:empty"
    mean = sum(map(len, words)) / len(words)
    return None if low <= mean <= high else "mean_word_length"


def symbol_to_word_ratio(text: str | Doc, max_ratio: float = 0.1) -> str | None:
    """Hash signs and ellipses per word (Gopher)."""
    doc = as_doc(text)
    symbols = doc.text.count("#") + doc.text.count("...") + doc.text.count("\u2026")
    return None if doc.words and symbols / len(doc.words) <= max_ratio else "symbol_to_word_ratio"


def bullet_lines(text: str | Doc, max_share: float = 0.9) -> str | None:
    doc = as_doc(text)
    if not doc.lines:
        return None
    share = len(_BULLET_LINE.findall(doc.text)) / len(doc.lines)
    return None if share <= max_share else "bullet_lines"


def ellipsis_lines(text: str | Doc, max_share: float = 0.3) -> str | None:
    doc = as_doc(text)
    if not doc.lines:
        return None
    share = len(_ELLIPSIS_LINE.findall(doc.text)) / len(doc.lines)
    return None if share <= max_share else "ellipsis_lines"


SPACE, LETTER = 1, 2  # character classes for words_with_letters


@functools.lru_cache(maxsize=1 << 16)
def char_class(ch: str) -> int:
    return SPACE if ch.isspace() else LETTER if ch.isalpha() else 0


_ASCII_CLASS = np.array([char_class(chr(c)) for c in range(128)], dtype=np.uint8)


def words_with_letters(text: str) -> int:
    """How many whitespace-separated words (`str.split`) have at least one letter (`str.isalpha`).
    In numpy over the code points: a word's characters get its index from a cumulative sum of
    word starts; non-ASCII characters are classified once per distinct character."""
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cls = _ASCII_CLASS[np.minimum(cps, 127)]
    high = np.flatnonzero(cps > 127)
    if len(high):
        distinct, where = np.unique(cps[high], return_inverse=True)
        cls[high] = np.array([char_class(chr(c)) for c in distinct.tolist()], dtype=np.uint8)[where]
    inside = cls != SPACE
    starts = inside.copy()
    starts[1:] &= ~inside[:-1]
    word = np.cumsum(starts) - 1  # index of the word each character belongs to
    return int(np.count_nonzero(np.bincount(word[cls == LETTER], minlength=1)))


def alphabetic_words(text: str | Doc, min_share: float = 0.8) -> str | None:
    """Share of words with at least one letter (Gopher)."""
    doc = as_doc(text)
    share = words_with_letters(doc.text) / max(len(doc.words), 1)
    return None if share >= min_share else "alphabetic_words"


@functools.lru_cache(maxsize=16)
def _vocabulary_pattern(vocabulary: frozenset) -> re.Pattern:
    words = "|".join(sorted(map(re.escape, vocabulary), key=len, reverse=True))
    return re.compile(rf"(?<!{_LETTERS})(?:{words})(?!{_LETTERS})", re.I)


def stop_words(text: str | Doc, min_count: int = 2, vocabulary=GOPHER_STOP_WORDS) -> str | None:
    """At least `min_count` distinct words of `vocabulary` (whole runs of letters, any case)."""
    found = set()
    for m in _vocabulary_pattern(frozenset(vocabulary)).finditer(as_doc(text).text):
        found.add(m.group().lower())
        if len(found) >= min_count:
            return None
    return "stop_words"


def lorem_ipsum(text: str | Doc) -> str | None:
    return "lorem_ipsum" if LOREM.search(as_doc(text).text) else None


def _repeats(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier one, and their share of the characters."""
    seen, dups, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dups += 1
            dup_chars += len(item)
        seen.add(item)
    return dups / len(items), dup_chars / max(sum(len(i) for i in items), 1)


def duplicate_lines(text: str | Doc, max_line_share: float = 0.3, max_char_share: float = 0.2) -> str | None:
    """Lines that repeat an earlier line: their share of lines and of characters (Gopher)."""
    lines = as_doc(text).lines
    if not lines:
        return None
    share, chars = _repeats(lines)
    return "duplicate_lines" if share > max_line_share or chars > max_char_share else None


def duplicate_paragraphs(text: str | Doc, max_share: float = 0.3, max_char_share: float = 0.2) -> str | None:
    """The same for paragraphs (blocks separated by blank lines)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", as_doc(text).text) if p.strip()]
    if len(paras) < 2:
        return None
    share, chars = _repeats(paras)
    return "duplicate_paragraphs" if share > max_share or chars > max_char_share else None


TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """Hash of the n-gram starting at each word: sum_k ids[i + k] * Q^k (mod 2^64)."""
    out = np.zeros(len(ids) - n + 1, dtype=np.uint64)
    q = np.uint64(1)
    with np.errstate(over="ignore"):
        for k in range(n):
            out += ids[k:len(ids) - n + 1 + k] * q
            q = q * _Q
    return out


def _first_occurrences(values: np.ndarray) -> np.ndarray:
    """Boolean mask: True where a value occurs for the first time."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    first = np.ones(len(values), dtype=bool)
    first[1:] = sorted_values[1:] != sorted_values[:-1]
    mask = np.empty(len(values), dtype=bool)
    mask[order] = first
    return mask


def repeated_ngrams(text: str | Doc, top_max: dict = TOP_NGRAM_MAX, dup_max: dict = DUP_NGRAM_MAX) -> str | None:
    """Gopher's n-gram repetition: the characters covered by the most frequent 2-4-gram, and by
    all duplicated 5-10-grams, as a share of all word characters. N-grams are compared by a
    64-bit hash of their lower-cased words (a collision is about as likely as 2^-64 per pair).

    Shortcuts that keep the answer: an n-gram occurs at most as often as the most frequent shorter
    one (its prefix occurs wherever it does), so a top n-gram whose widest possible span, times
    that count, stays within the limit needs no count. A word covered by a repeated (n+1)-gram is
    covered by a repeated n-gram, so the coverage can only fall as n grows; when the smallest n's
    coverage is within every larger n's limit, those are not computed."""
    ids, lengths = as_doc(text).word_ids
    total = int(lengths.sum())
    if total == 0:
        return None
    best_shorter = None  # the top count of a shorter n-gram bounds this one's (its prefix repeats)
    for n, limit in top_max.items():
        if len(ids) < n:
            continue
        if best_shorter is not None and n > best_shorter[0]:
            widest = int(np.convolve(lengths, np.ones(n, dtype=np.int64), "valid").max())
            if best_shorter[1] * widest / total <= limit:
                continue  # even the widest n-gram, repeated that often, stays within the limit
        hashes = _ngram_hashes(ids, n)
        grams = np.sort(hashes)
        starts = np.flatnonzero(np.concatenate([[True], grams[1:] != grams[:-1], [True]]))
        runs = np.diff(starts)  # how often each distinct n-gram occurs
        best = int(runs.max())
        if best_shorter is None or n < best_shorter[0]:
            best_shorter = (n, best)
        if best > 1:
            # the n-gram Counter.most_common(1) picks: the first seen of those occurring `best` times
            tied = grams[starts[:-1][runs == best]]
            start = int(np.flatnonzero(np.isin(hashes, tied))[0])
            if best * int(lengths[start:start + n].sum()) / total > limit:
                return f"top_{n}gram"
    for i, (n, limit) in enumerate(dup_max.items()):
        if len(ids) < n:
            continue
        repeat = ~_first_occurrences(_ngram_hashes(ids, n))  # an n-gram seen before covers n words
        starts = np.flatnonzero(repeat)
        cover = np.cumsum(np.bincount(starts, minlength=len(ids) + 1)
                          - np.bincount(starts + n, minlength=len(ids) + 1))[:len(ids)] > 0
        share = int(lengths[cover].sum()) / total
        if share > limit:
            return f"duplicate_{n}gram"
        if all(m >= n and share <= later for m, later in list(dup_max.items())[i + 1:]):
            return None
    return None


@dataclass
class RuleSet:
    """All document rules with their thresholds; `apply` cleans lines, then checks the rules."""
    min_words: int = 50
    max_words: int = 100_000
    min_mean_word_length: float = 3.0
    max_mean_word_length: float = 10.0
    max_symbol_ratio: float = 0.1
    max_bullet_share: float = 0.9
    max_ellipsis_share: float = 0.3
    min_alphabetic_share: float = 0.8
    min_stop_words: int = 2
    max_duplicate_line_share: float = 0.3
    max_duplicate_line_chars: float = 0.2
    max_duplicate_paragraph_share: float = 0.3
    clean_boilerplate_lines: bool = True

    def check(self, text: str | Doc) -> str | None:
        """The first rule `text` fails, or None."""
        doc = as_doc(text)
        for rule in (lambda t: word_count(t, self.min_words, self.max_words),
                     lambda t: mean_word_length(t, self.min_mean_word_length, self.max_mean_word_length),
                     lambda t: symbol_to_word_ratio(t, self.max_symbol_ratio),
                     lambda t: bullet_lines(t, self.max_bullet_share),
                     lambda t: ellipsis_lines(t, self.max_ellipsis_share),
                     lambda t: alphabetic_words(t, self.min_alphabetic_share),
                     lambda t: stop_words(t, self.min_stop_words),
                     lorem_ipsum,
                     lambda t: duplicate_lines(t, self.max_duplicate_line_share,
                                               self.max_duplicate_line_chars),
                     lambda t: duplicate_paragraphs(t, self.max_duplicate_paragraph_share),
                     repeated_ngrams):
            reason = rule(doc)
            if reason:
                return reason
        return None

    def apply(self, record: dict) -> str | None:
        """Clean `record["text"]` in place and return None to keep it, else the reason."""
        if self.clean_boilerplate_lines:
            record["text"], removed = clean_lines(record["text"])
            if removed:
                record["boilerplate_lines_removed"] = removed
        return self.check(record["text"])
