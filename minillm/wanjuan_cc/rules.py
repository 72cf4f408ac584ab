"""Heuristic quality rules (WanJuan-CC stage 4), in the Gopher (Rae et al. 2021) and C4 (Raffel et
al. 2020) family. The paper leaves exact thresholds open; defaults here are Gopher's and C4's.

Line-level cleaning runs first (`clean_lines`: drops boilerplate lines such as "enable javascript"
or cookie notices, C4 style). Then every document-level rule is a named function
`rule(text, ...thresholds) -> None | reason` that returns None to keep the document. `RuleSet`
applies them in order with the thresholds as fields and returns the first reason a document fails.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

_WORD = re.compile(r"\S+")
_BULLET = re.compile(r"^\s*[\u2022\u2023\u25e6\u2043\u2219\-\*\u25aa\u25cf\u00b7]\s")
_ELLIPSIS = ("...", "\u2026")
GOPHER_STOP_WORDS = {"the", "be", "to", "of", "and", "that", "have", "with"}
BOILERPLATE_LINE = re.compile(
    r"javascript|cookie|terms of use|privacy policy|all rights reserved|sign up for our newsletter"
    r"|log ?in to continue|click here to|accept all",
    re.I)
LOREM = re.compile(r"lorem ipsum", re.I)


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


# --- line-level cleaning ---------------------------------------------------------------------------

def clean_lines(text: str, pattern: re.Pattern = BOILERPLATE_LINE, max_line_words: int = 40) -> tuple[str, int]:
    """Drop boilerplate lines (matching `pattern`) that are short (a long paragraph that mentions
    cookies is prose, not a notice). Returns (text, lines removed)."""
    kept, removed = [], 0
    for line in text.split("\n"):
        if pattern.search(line) and len(words_of(line)) <= max_line_words:
            removed += 1
        else:
            kept.append(line)
    return "\n".join(kept), removed


# --- document rules ---------------------------------------------------------------------------------

def word_count(text: str, min_words: int = 50, max_words: int = 100_000) -> str | None:
    n = len(words_of(text))
    return None if min_words <= n <= max_words else f"word_count:{'low' if n < min_words else 'high'}"


def mean_word_length(text: str, low: float = 3.0, high: float = 10.0) -> str | None:
    words = words_of(text)
    if not words:
        return "mean_word_length:empty"
    mean = sum(len(w) for w in words) / len(words)
    return None if low <= mean <= high else "mean_word_length"


def symbol_to_word_ratio(text: str, max_ratio: float = 0.1) -> str | None:
    """Hash signs and ellipses per word (Gopher)."""
    words = words_of(text)
    symbols = text.count("#") + text.count("...") + text.count("\u2026")
    return None if words and symbols / len(words) <= max_ratio else "symbol_to_word_ratio"


def bullet_lines(text: str, max_share: float = 0.9) -> str | None:
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return None
    share = sum(bool(_BULLET.match(line)) for line in lines) / len(lines)
    return None if share <= max_share else "bullet_lines"


def ellipsis_lines(text: str, max_share: float = 0.3) -> str | None:
    lines = [line.rstrip() for line in text.split("\n") if line.strip()]
    if not lines:
        return None
    share = sum(line.endswith(_ELLIPSIS) for line in lines) / len(lines)
    return None if share <= max_share else "ellipsis_lines"


def alphabetic_words(text: str, min_share: float = 0.8) -> str | None:
    """Share of words with at least one letter (Gopher)."""
    words = words_of(text)
    share = sum(any(c.isalpha() for c in w) for w in words) / max(len(words), 1)
    return None if share >= min_share else "alphabetic_words"


def stop_words(text: str, min_count: int = 2, vocabulary=GOPHER_STOP_WORDS) -> str | None:
    found = {w.lower().strip(".,;:!?\"'()") for w in words_of(text)} & vocabulary
    return None if len(found) >= min_count else "stop_words"


def lorem_ipsum(text: str) -> str | None:
    return "lorem_ipsum" if LOREM.search(text) else None


def _repeats(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier one, and their share of the characters."""
    seen, dups, dup_chars = set(), 0, 0
    for item in items:
        if item in seen:
            dups += 1
            dup_chars += len(item)
        seen.add(item)
    return dups / len(items), dup_chars / max(sum(len(i) for i in items), 1)


def duplicate_lines(text: str, max_line_share: float = 0.3, max_char_share: float = 0.2) -> str | None:
    """Lines that repeat an earlier line: their share of lines and of characters (Gopher)."""
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines:
        return None
    share, chars = _repeats(lines)
    return "duplicate_lines" if share > max_line_share or chars > max_char_share else None


def duplicate_paragraphs(text: str, max_share: float = 0.3, max_char_share: float = 0.2) -> str | None:
    """The same for paragraphs (blocks separated by blank lines)."""
    paras = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paras) < 2:
        return None
    share, chars = _repeats(paras)
    return "duplicate_paragraphs" if share > max_share or chars > max_char_share else None


TOP_NGRAM_MAX = {2: 0.20, 3: 0.18, 4: 0.16}
DUP_NGRAM_MAX = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


def repeated_ngrams(text: str, top_max: dict = TOP_NGRAM_MAX, dup_max: dict = DUP_NGRAM_MAX) -> str | None:
    """Gopher's n-gram repetition: the characters covered by the most frequent 2-4-gram, and by
    all duplicated 5-10-grams, as a share of all word characters."""
    words = [w.lower() for w in words_of(text)]
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

    def check(self, text: str) -> str | None:
        """The first rule `text` fails, or None."""
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
            reason = rule(text)
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
