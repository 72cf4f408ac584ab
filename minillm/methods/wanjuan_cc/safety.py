"""Content safety (WanJuan-CC stage 6): domain and keyword blocklists, PII masking, lexicon scores.

- Domain blocklist: a document whose URL's host is a listed domain or a subdomain of one is removed.
- Keyword blocklist with weights: a document whose summed keyword weight per 100 words reaches
  `max_keyword_score` is removed.
- PII masking: e-mail addresses, phone numbers and IP addresses are replaced by `<EMAIL>`,
  `<PHONE>`, `<IP>`; counts are recorded per document.
- `toxic_score` and `porn_score`: lexicon scores in [0, 1), 1 - exp(-weighted hits per 100 words).
  The built-in lexicons are deliberately tiny and mild; pass your own (a {word: weight} dict, or a
  `HashedNgramClassifier` from `quality.py` trained on your labels) for real use.
"""

from __future__ import annotations

import math
import re
from urllib.parse import urlsplit

EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b")
IPV6 = re.compile(r"\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b")
# international or North-American style numbers: +country, groups separated by space, dot or dash
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?|\d{2,4}[\s.-])\d{3,4}[\s.-]\d{3,4}\b")

TOXIC_LEXICON = {"idiot": 1.0, "stupid": 0.5, "moron": 1.0, "hate": 0.3, "kill": 0.3, "loser": 0.5,
                 "dumb": 0.5, "shut up": 0.5}
ADULT_LEXICON = {"porn": 2.0, "xxx": 1.5, "nude": 1.0, "nsfw": 1.5, "escort": 1.0, "sex": 0.5,
                 "erotic": 1.0, "camgirl": 2.0}


def host_of(url) -> str:
    """The lower-cased host of a URL; "" for anything that is not one (including non-strings)."""
    if not isinstance(url, str):
        return ""
    try:
        return (urlsplit(url).hostname or "").lower()
    except ValueError:
        return ""


def domain_blocked(url: str, blocklist: set[str]) -> bool:
    host = host_of(url)
    parts = host.split(".")
    return any(".".join(parts[i:]) in blocklist for i in range(len(parts)))


# Necessary conditions, far cheaper to search for than the patterns themselves (Python's re is slow
# on patterns that begin with alternatives): a text without them has nothing to mask.
_PREFILTER = {"ip": re.compile(r"\d\.\d+\.\d+\.\d"), "ip6": re.compile(r"[0-9A-Fa-f]:[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]"),
              "phone": re.compile(r"\d\d\d[\s.-]\d\d\d")}


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """Replace e-mails, IP addresses and phone numbers; return (text, counts)."""
    counts = {}
    for name, pattern, token in (("email", EMAIL, "<EMAIL>"), ("ip", IPV4, "<IP>"),
                                 ("ip6", IPV6, "<IP>"), ("phone", PHONE, "<PHONE>")):
        if ("@" not in text) if name == "email" else not _PREFILTER[name].search(text):
            counts[name] = 0
            continue
        text, n = pattern.subn(token, text)
        counts[name] = n
    counts["ip"] += counts.pop("ip6")
    return text, counts


def count_term(lowered: str, term: str) -> int:
    """Occurrences of `term` in lower-cased text: as a whole word (not inside a longer run of
    letters and digits) for one-word terms, anywhere for phrases. str.find, not a regex: fast."""
    if " " in term:
        return lowered.count(term)
    n, i, end = 0, lowered.find(term), len(term)
    while i >= 0:
        before = lowered[i - 1] if i else " "
        after = lowered[i + end] if i + end < len(lowered) else " "
        n += not (before.isalnum() or after.isalnum())
        i = lowered.find(term, i + 1)
    return n


def lexicon_score(text: str, lexicon: dict[str, float], lowered: str | None = None,
                  words: int | None = None) -> float:
    """1 - exp(-(weighted lexicon hits per 100 words)): 0 for none, towards 1 as they pile up.
    Words are whitespace-separated; pass `lowered` and `words` when scoring one text twice."""
    words = len(text.split()) if words is None else words
    if not words:
        return 0.0
    lowered = text.lower() if lowered is None else lowered
    hits = sum(weight * count_term(lowered, term) for term, weight in lexicon.items())
    return 1 - math.exp(-hits * 100 / words)


class SafetyFilter:
    """Blocklists, PII masking and safety scores for one record at a time."""

    def __init__(self, blocked_domains=(), blocked_keywords: dict[str, float] | None = None,
                 max_keyword_score: float = 1.0, toxic_lexicon=TOXIC_LEXICON,
                 adult_lexicon=ADULT_LEXICON, toxic_model=None, adult_model=None):
        self.blocked_domains = {d.lower().strip(".") for d in blocked_domains}
        self.blocked_keywords = blocked_keywords or {}
        self.max_keyword_score = max_keyword_score
        self.toxic_lexicon, self.adult_lexicon = toxic_lexicon, adult_lexicon
        self.toxic_model, self.adult_model = toxic_model, adult_model

    def __call__(self, record: dict) -> str | None:
        url = record.get("url")
        if self.blocked_domains and isinstance(url, str) and domain_blocked(url, self.blocked_domains):
            return "safety:blocked_domain"
        text = record["text"]
        lowered, words = text.lower(), len(text.split())
        if self.blocked_keywords:
            score = sum(w * lowered.count(k) for k, w in self.blocked_keywords.items()) * 100 / max(words, 1)
            if score >= self.max_keyword_score:
                return "safety:blocked_keywords"
        record["text"], counts = mask_pii(text)
        record["pii_masked"] = counts
        if any(counts.values()):  # the masks change the text the scores read
            lowered, words = record["text"].lower(), len(record["text"].split())
        for key, model, lexicon in (("toxic_score", self.toxic_model, self.toxic_lexicon),
                                    ("porn_score", self.adult_model, self.adult_lexicon)):
            score = (float(model.predict_proba([record["text"]])[0]) if model
                     else lexicon_score(record["text"], lexicon, lowered, words))
            record[key] = round(score, 4)
        return None
