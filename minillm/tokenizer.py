"""Byte-level BPE: trained here in Python, encoded and decoded by tiktoken.

Training follows GPT-2's byte-level BPE (Sennrich et al. 2016; Radford et al. 2019): split text
into "words" with a regex pre-tokenizer, start every word as its UTF-8 bytes, and repeatedly merge
the most frequent adjacent pair of tokens into a new token. The result is a rank table
(`bytes -> rank`, ranks in merge order after the 256 single bytes) which is exactly what
`tiktoken.Encoding(mergeable_ranks=...)` consumes, so all encoding and decoding runs in tiktoken's
Rust core.

Why training is fast enough in Python: pairs are counted over *unique* words weighted by their
counts (a few hundred thousand words instead of millions), and a merge only revisits the words that
contain the merged pair (an index `pair -> word ids`), updating the counts of the pairs it touches.
A max-heap with lazy invalidation finds the next pair. Nothing is ever recounted from scratch.

The pre-tokenizer patterns use `\\p{L}` / `\\p{N}` (Unicode letters / numbers), which Python's `re`
does not support. We use the third-party `regex` module, which does, and which tiktoken itself
depends on: training therefore splits text with the very pattern tiktoken uses when encoding.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex
import tiktoken

from .errors import UserError
from .fileio import write_json

# GPT-2's split pattern (contractions, letter runs, number runs, punctuation runs, whitespace).
GPT2_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
# GPT-4's (cl100k_base) pattern: case-insensitive contractions, numbers in groups of at most three
# digits, newlines kept apart from other whitespace.
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

EOT = "<|endoftext|>"
FILE_FORMAT = "minillm.tokenizer"
FILE_VERSION = 1


class Tokenizer:
    """A byte-level BPE tokenizer: a rank table, a split pattern and special tokens.

    All encoding and decoding is delegated to `self.encoding`, a `tiktoken.Encoding`. Special tokens
    (`<|endoftext|>` by default) get the ids right after the ordinary tokens. Ordinary text that
    contains a special token's string is refused unless that token is passed in `allowed_special`,
    so a document can never smuggle in a control token.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str,
                 special_tokens: dict[str, int] | None = None, name: str = "minillm",
                 eot_token: str = EOT):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self.name = name
        self.eot_token = eot_token  # the special token that ends a document
        self.encoding = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                          special_tokens=self.special_tokens)

    # --- encoding -------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, i.e. one more than the largest id (the model's embedding rows)."""
        return self.encoding.max_token_value + 1

    @property
    def eot_id(self) -> int:
        """Id of the end-of-text token (`<|endoftext|>` unless the tokenizer names another), the
        document separator."""
        if self.eot_token not in self.special_tokens:
            raise KeyError(f"tokenizer {self.name!r} has no end-of-text special token "
                           f"{self.eot_token!r}")
        return self.special_tokens[self.eot_token]

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        """Token ids of `text`. A special token's string in `text` raises ValueError unless allowed
        (`allowed_special="all"` allows every special token)."""
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        for special in self.special_tokens:
            if special not in allowed and special in text:
                raise ValueError(
                    f"text contains the special token {special!r}: pass "
                    f"allowed_special={{{special!r}}} (or \"all\") to Tokenizer.encode to encode it "
                    "as that token, or use encode_ordinary to encode it as plain text")
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text` treating special-token strings as plain text (for raw corpora)."""
        return self.encoding.encode_ordinary(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode_ordinary` over many texts; tiktoken releases the GIL, so threads run in parallel."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 (a cut multi-byte character) become U+FFFD."""
        return self.encoding.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token_id)

    # --- files ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """A JSON-serialisable description (also embedded in checkpoints). `ranks` lists the
        tokens in rank order; `rank_ids` is present only when the ranks are not 0..n-1 (e.g. a
        converted tokenizer with special tokens in the middle of its ids)."""
        by_rank = sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        d = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "name": self.name,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "eot_token": self.eot_token,
            "ranks": [base64.b64encode(token).decode("ascii") for token, _ in by_rank],
        }
        if any(rank != i for i, (_, rank) in enumerate(by_rank)):
            d["rank_ids"] = [rank for _, rank in by_rank]
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "<dict>") -> "Tokenizer":
        """Inverse of `to_dict`; `source` names the file in error messages."""
        if not isinstance(d, dict) or d.get("format") != FILE_FORMAT:
            raise ValueError(f"{source}: not a minillm tokenizer (expected \"format\": \"{FILE_FORMAT}\")")
        if d.get("version") != FILE_VERSION:
            raise ValueError(f"{source}: tokenizer file version {d.get('version')!r}, "
                             f"this minillm reads version {FILE_VERSION}")
        for field in ("pattern", "special_tokens", "ranks"):
            if field not in d:
                raise ValueError(f"{source}: missing field {field!r}")
        rank_ids = d.get("rank_ids", range(len(d["ranks"])))
        if len(rank_ids) != len(d["ranks"]):
            raise ValueError(f"{source}: fields 'ranks' and 'rank_ids' differ in length")
        try:
            ranks = {base64.b64decode(s, validate=True): int(r) for s, r in zip(d["ranks"], rank_ids)}
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: field 'ranks' must be a list of base64 strings ({e})") from None
        if len(ranks) != len(d["ranks"]):
            raise ValueError(f"{source}: field 'ranks' holds duplicate tokens")
        return cls(ranks, d["pattern"], {str(k): int(v) for k, v in d["special_tokens"].items()},
                   name=d.get("name", "minillm"), eot_token=d.get("eot_token", EOT))

    def save(self, path: str | os.PathLike) -> None:
        """Write the tokenizer to one JSON file, atomically (temporary file, then rename)."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        """Read a file written by `save`."""
        return cls.from_dict(read_json(path), source=str(path))

    @classmethod
    def from_tiktoken(cls, name: str) -> "Tokenizer":
        """A named tiktoken encoding (gpt2, cl100k_base, o200k_base, ...). tiktoken downloads its rank
        file on first use, so this needs the network once (or a warm TIKTOKEN_CACHE_DIR)."""
        enc = tiktoken.get_encoding(name)
        return cls(enc._mergeable_ranks, enc._pat_str, enc._special_tokens, name=name)

    @classmethod
    def from_tiktoken_file(cls, path: str | os.PathLike, pattern: str = GPT2_PATTERN,
                           special_tokens: dict[str, int] | None = None) -> "Tokenizer":
        """A rank table in tiktoken's own file format (`base64 rank` per line), e.g. the
        `gpt2.tiktoken` file that some packages ship, usable offline."""
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tiktoken rank file not found: {path}")
        ranks = load_tiktoken_bpe(str(path))
        if special_tokens is None:
            special_tokens = {EOT: max(ranks.values()) + 1}
        return cls(ranks, pattern, special_tokens, name=path.stem)

    def __repr__(self) -> str:
        return (f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size}, "
                f"special_tokens={sorted(self.special_tokens)})")


def read_json(path: str | os.PathLike):
    """The JSON object in a tokenizer file; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a minillm tokenizer file (invalid JSON: {e})") from None


# --- training ------------------------------------------------------------------------------------

def count_words(texts: Iterable[str], pattern: str = GPT4_PATTERN,
                special_tokens: Iterable[str] = (EOT,)) -> Counter:
    """Pre-tokenize `texts` and count each distinct word (a str). Special-token strings are cut out
    first, so that BPE never learns merges across or inside them."""
    split = regex.compile(pattern)
    specials = sorted(special_tokens, key=len, reverse=True)
    cut = regex.compile("|".join(regex.escape(s) for s in specials)) if specials else None
    counts: Counter = Counter()
    for text in texts:
        for part in (cut.split(text) if cut else (text,)):
            counts.update(split.findall(part))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str = GPT4_PATTERN,
              special_tokens: Iterable[str] = (EOT,), name: str = "minillm",
              word_counts: Counter | None = None) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` ids in total (256 bytes + merges + special
    tokens). Deterministic: among pairs of equal count the one with the smallest ids merges first.

    `word_counts` (from `count_words`) may be given instead of `texts` to reuse a pre-tokenization.
    Training stops early when no pair occurs twice or more (the corpus is too small for the vocab).
    """
    special_tokens = list(dict.fromkeys(special_tokens))
    num_merges = vocab_size - 256 - len(special_tokens)
    if num_merges < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than 256 bytes + "
                         f"{len(special_tokens)} special tokens")
    if word_counts is None:
        word_counts = count_words(texts, pattern, special_tokens)

    vocab = [bytes([i]) for i in range(256)]  # token id -> bytes
    id_of = {b: i for i, b in enumerate(vocab)}  # bytes -> token id
    # Words of one byte can never take part in a merge; leave them out.
    words = [list(w.encode("utf-8")) for w in word_counts]
    freqs = list(word_counts.values())
    keep = [i for i, w in enumerate(words) if len(w) > 1]
    words = [words[i] for i in keep]
    freqs = [freqs[i] for i in keep]

    pair_counts: dict[tuple[int, int], int] = {}
    where: dict[tuple[int, int], set[int]] = {}  # pair -> ids of words that (may) contain it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for pair in zip(w, w[1:]):
            pair_counts[pair] = pair_counts.get(pair, 0) + f
            where.setdefault(pair, set()).add(wi)
    # Max-heap of (-count, pair). Counts only ever drop for existing pairs, so stale entries are
    # detected on pop and pushed back with their current count; new pairs are pushed when created.
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges_done = 0
    while merges_done < num_merges and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        if count < 2:
            break  # nothing left worth merging
        a, b = pair
        merged = vocab[a] + vocab[b]
        new_id = id_of.get(merged)
        if new_id is None:  # a byte string can arise from two different merges; keep ids unique
            new_id = len(vocab)
            vocab.append(merged)
            id_of[merged] = new_id
            merges_done += 1
        created = _merge_pair(a, b, new_id, where.pop(pair), words, freqs, pair_counts, where)
        for p in created:
            heapq.heappush(heap, (-pair_counts[p], p))

    ranks = {token: i for i, token in enumerate(vocab)}
    specials = {s: len(vocab) + i for i, s in enumerate(special_tokens)}
    return Tokenizer(ranks, pattern, specials, name=name)


def _merge_pair(a: int, b: int, new_id: int, word_ids: set[int], words: list[list[int]],
                freqs: list[int], pair_counts: dict, where: dict) -> set[tuple[int, int]]:
    """Replace every (a, b) by `new_id` in the given words, updating pair counts and the index.
    Returns the pairs that contain `new_id` (the only pairs whose count can have grown)."""
    created = set()
    for wi in word_ids:
        w = words[wi]
        n = len(w)
        out = []
        i = 0
        while i < n:
            if w[i] == a and i + 1 < n and w[i + 1] == b:
                out.append(new_id)
                i += 2
            else:
                out.append(w[i])
                i += 1
        if len(out) == n:
            continue  # stale index entry: an earlier merge already consumed this pair here
        f = freqs[wi]
        for p in zip(w, w[1:]):
            pair_counts[p] -= f
        for p in zip(out, out[1:]):
            pair_counts[p] = pair_counts.get(p, 0) + f
            if p[0] == new_id or p[1] == new_id:
                s = where.get(p)
                if s is None:
                    where[p] = s = set()
                s.add(wi)
                created.add(p)
        words[wi] = out
    pair_counts.pop((a, b), None)
    return created


# --- SentencePiece, behind the same interface ---------------------------------------------------------

SPM_FORMAT = "minillm.sentencepiece"


class SentencePieceTokenizer:
    """A SentencePiece model (e.g. LLaMA-2's `tokenizer.model`) with `Tokenizer`'s interface.

    Needs the optional `sentencepiece` package. Control symbols (`<s>`, `</s>`, ...) are the special
    tokens; as in `Tokenizer`, their strings in ordinary text are refused by `encode` unless
    allowed, and `encode_ordinary` treats them as text. No BOS is added: callers decide."""

    def __init__(self, model_proto: bytes, name: str = "sentencepiece"):
        import sentencepiece

        self.model_proto, self.name = model_proto, name
        self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self._split = (regex.compile("(" + "|".join(regex.escape(t) for t in sorted(
            self.special_tokens, key=len, reverse=True)) + ")") if self.special_tokens else None)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eot_id(self) -> int:
        if self.sp.eos_id() < 0:
            raise KeyError(f"SentencePiece model {self.name!r} has no end-of-sequence piece")
        return self.sp.eos_id()

    def encode(self, text: str, allowed_special: Iterable[str] | str = ()) -> list[int]:
        allowed = set(self.special_tokens) if allowed_special == "all" else set(allowed_special)
        if self._split is None:
            return self.encode_ordinary(text)
        ids: list[int] = []
        for part in self._split.split(text):
            if part in self.special_tokens:
                if part not in allowed:
                    raise ValueError(f"text contains the special token {part!r}; pass "
                                     "allowed_special to encode it as such")
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_ordinary(part))
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_ordinary_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.sp.encode(texts, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.sp.id_to_piece(token_id)
        if self.sp.is_byte(token_id):  # byte fallback pieces look like <0xAB>
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def to_dict(self) -> dict:
        return {"format": SPM_FORMAT, "version": 1, "name": self.name,
                "model": base64.b64encode(self.model_proto).decode("ascii")}

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """A `tokenizer.model` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SentencePiece model not found: {path}")
        return cls(path.read_bytes(), name=path.stem)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(name={self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | os.PathLike):
    """A tokenizer file minillm wrote (`Tokenizer.save`, `SentencePieceTokenizer.save`). Hugging
    Face folders and files are read by `minillm.hf.load_any_tokenizer`, which reads these too."""
    d = read_json(path)
    if isinstance(d, dict) and "format" not in d and "model" in d:
        raise UserError(f"{path}: a Hugging Face tokenizer.json; load it with "
                        "minillm.hf.load_any_tokenizer")
    return tokenizer_from_dict(d, source=str(path))


def tokenizer_from_dict(d: dict, source: str = "<dict>"):
    """A `Tokenizer` or `SentencePieceTokenizer` from its `to_dict` form."""
    if isinstance(d, dict) and d.get("format") == SPM_FORMAT:
        return SentencePieceTokenizer(base64.b64decode(d["model"]), name=d.get("name", "sentencepiece"))
    return Tokenizer.from_dict(d, source)

