"""Language identification (WanJuan-CC stage 3): script statistics, then stop words.

A simple, documented identifier that needs no model:
1. Script: the share of letters in each Unicode script family (Latin, Cyrillic, Greek, Arabic,
   Hebrew, CJK, Hangul, Devanagari, Thai). A page whose letters are mostly non-Latin gets that
   script's code (e.g. 'cjk'), which is enough to reject it from an English corpus.
2. Latin pages: the share of words that are common function words of each language; the language
   with the highest share wins, if it reaches `min_stopword_share`, else 'unknown'.

Users with a real language-ID model pass any callable `text -> (language, confidence)` instead.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from collections.abc import Callable

STOP_WORDS = {
    "en": set("the of and to in is that for it with as was on be by this are from at or an have "
              "not which but they his her you we were their has had been will would there can".split()),
    "de": set("der die und das ist nicht ein eine zu den von mit sich des auf für im dem auch es "
              "sie als wird ich werden oder aus bei nach wie".split()),
    "fr": set("le la les et des est un une du que pour dans qui en pas au sur ne se par plus avec "
              "sont ce il elle nous vous mais ou".split()),
    "es": set("el la los las de que y en un una es por con para no del se al lo como más pero sus "
              "le ya o este sí porque".split()),
    "it": set("il di che la e per un una non in sono con si da del della le gli ma come anche "
              "questo alla nel più".split()),
    "nl": set("de het een van en is dat op te zijn niet met voor die aan er ook als bij door maar "
              "om dan zo".split()),
    "pt": set("o a os as de que e do da em um uma para com não por se na no mais mas como dos das "
              "ao ou foi".split()),
}
_WORD = re.compile(r"[^\W\d_]+", re.UNICODE)
_SCRIPTS = [("cjk", ("CJK", "HIRAGANA", "KATAKANA")), ("hangul", ("HANGUL",)),
            ("cyrillic", ("CYRILLIC",)), ("greek", ("GREEK",)), ("arabic", ("ARABIC",)),
            ("hebrew", ("HEBREW",)), ("devanagari", ("DEVANAGARI",)), ("thai", ("THAI",)),
            ("latin", ("LATIN",))]


_NOT_ASCII_LETTER = bytes(c for c in range(128) if not chr(c).isalpha())
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


@functools.lru_cache(maxsize=1 << 16)
def script_of(ch: str) -> str | None:
    """The script family of one character, None if it is not a letter."""
    if not ch.isalpha():
        return None
    name = unicodedata.name(ch, "")
    return next((fam for fam, keys in _SCRIPTS if name.startswith(keys)), "other")


def script_shares(text: str, sample: int = 5000) -> dict[str, float]:
    """Share of letters per script family in the first `sample` characters. ASCII letters are
    counted in bulk (bytes.translate); only non-ASCII characters are looked up, one per kind."""
    head = text[:sample]
    counts: Counter = Counter()
    ascii_letters = len(head.encode("ascii", "ignore").translate(None, _NOT_ASCII_LETTER))
    if ascii_letters:
        counts["latin"] = ascii_letters
    if not head.isascii():
        for ch, n in Counter(_NON_ASCII.findall(head)).items():
            family = script_of(ch)
            if family:
                counts[family] += n
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def identify(text: str, min_stopword_share: float = 0.05) -> tuple[str, float]:
    """(language code, confidence in [0, 1]) of `text`."""
    shares = script_shares(text)
    if not shares:
        return "unknown", 0.0
    script, share = max(shares.items(), key=lambda kv: kv[1])
    if script != "latin":
        return script, share
    words = _WORD.findall(text[:20000].lower())
    if not words:
        return "unknown", 0.0
    counts = Counter(words)
    scores = {lang: sum(counts.get(w, 0) for w in stops) / len(words) for lang, stops in STOP_WORDS.items()}
    lang, best = max(scores.items(), key=lambda kv: kv[1])
    if best < min_stopword_share:
        return "unknown", best
    return lang, min(1.0, best * 3)  # ~0.3 of words are function words in running English


class LanguageFilter:
    """Keep documents whose identified language is in `keep` with at least `min_confidence`.
    `identifier` defaults to `identify`; any `text -> (language, confidence)` callable works."""

    def __init__(self, keep=("en",), min_confidence: float = 0.3,
                 identifier: Callable[[str], tuple[str, float]] | None = None):
        self.keep, self.min_confidence = set(keep), min_confidence
        self.identifier = identifier or identify

    def __call__(self, record: dict) -> str | None:
        """None to keep (and records `language`, `language_score`), else the rejection reason."""
        lang, conf = self.identifier(record["text"])
        record["language"], record["language_score"] = lang, round(conf, 4)
        if lang not in self.keep:
            return f"language:{lang}"
        if conf < self.min_confidence:
            return "language:low_confidence"
        return None
