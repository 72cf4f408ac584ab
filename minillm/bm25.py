"""BM25 retrieval over an inverted index held in numpy arrays (Okapi BM25; Robertson et al. 1994,
variants as named by Kamphuis et al. 2020, "Which BM25 do you mean?").

The index is CSR-like: the postings of term t are `doc_ids[indptr[t]:indptr[t + 1]]` (ascending),
with their term frequencies in `tfs` and, because k1, b and the IDF variant are fixed when the index
is built, their finished BM25 weights in `weights` (float64). A query's score for document d is the
sum, over the query's tokens (a repeated token counts again), of the weight of (token, d):

    weight(t, d) = idf(t) * tf * c / (tf + k1 * (1 - b + b * len(d) / avg_len))

with c = 1 for "lucene" and "robertson" and c = k1 + 1 for "atire" (c only scales scores), and

    lucene:    idf = log(1 + (N - df + 0.5) / (df + 0.5))      (always > 0)
    robertson: idf = log((N - df + 0.5) / (df + 0.5))          (< 0 for a term in over half the docs)
    atire:     idf = log(N / df)

Why it is fast: a query touches only the postings of its own terms. Scores are added into a dense
scratch array at those documents, read back at the union of those documents, and the scratch is
cleared there again, so a query costs O(postings of its terms), never O(number of documents). Top-k
is an `argpartition` over the matched documents and one `lexsort`. The scratch arrays belong to the
index object: searches from several threads need one object each.

Contract of `search`: the result holds only documents that contain at least one query token,
ordered by score (descending), ties by document id (ascending), at most k of them. An empty query,
a query of unknown terms, or an empty index gives an empty result, never an error. Building is done
in shards of `shard_docs` documents (each counted with one `np.unique`), then merged; `save` writes
the arrays as .npy files and `BM25Index.load` memory-maps them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import UserError
from .fileio import write_json

IDF_VARIANTS = ("lucene", "robertson", "atire")
FORMAT = "minillm-bm25-v1"
_WORD = re.compile(r"\w+")


def word_tokenize(text: str) -> list[str]:
    """The "word" tokenizer: lower-cased runs of letters, digits and underscores."""
    return _WORD.findall(text.lower())


def idf(variant: str, df: np.ndarray | float, n_docs: int) -> np.ndarray:
    """Inverse document frequency of terms found in `df` of `n_docs` documents."""
    df = np.asarray(df, dtype=np.float64)
    if variant == "lucene":
        return np.log(1.0 + (n_docs - df + 0.5) / (df + 0.5))
    if variant == "robertson":
        return np.log((n_docs - df + 0.5) / (df + 0.5))
    if variant == "atire":
        return np.log(n_docs / df)
    raise UserError(f"idf variant {variant!r}: expected one of {', '.join(IDF_VARIANTS)}")


class BM25Index:
    """An immutable BM25 index. Build with `BM25Index.build`, reopen with `BM25Index.load`."""

    def __init__(self, vocab: list[str], indptr: np.ndarray, doc_ids: np.ndarray, tfs: np.ndarray,
                 weights: np.ndarray, doc_lengths: np.ndarray, k1: float, b: float,
                 idf_variant: str, tokenizer: str = "word"):
        self.vocab = vocab
        self.term_id = {t: i for i, t in enumerate(vocab)}
        self.indptr, self.doc_ids, self.tfs, self.weights = indptr, doc_ids, tfs, weights
        self.doc_lengths = doc_lengths
        self.k1, self.b, self.idf_variant, self.tokenizer = k1, b, idf_variant, tokenizer
        self.tokenize: Callable[[str], list[str]] = word_tokenize
        self._acc = np.zeros(self.num_docs, dtype=np.float64)  # scratch: scores of one query
        self._seen = np.zeros(self.num_docs, dtype=bool)       # scratch: its matched documents

    @property
    def num_docs(self) -> int:
        return len(self.doc_lengths)

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def build(cls, documents: Iterable[str | Sequence[str]], k1: float = 1.5, b: float = 0.75,
              idf_variant: str = "lucene", tokenize: Callable[[str], list[str]] = word_tokenize,
              tokenizer: str = "word", shard_docs: int = 50_000) -> "BM25Index":
        """Index `documents`: strings (split by `tokenize`, named `tokenizer` in the saved index) or
        lists of tokens already split. The terms of a minillm `Tokenizer` work too: pass
        `tokenize=lambda s: [str(i) for i in tok.encode_ordinary(s)]` and name it."""
        if idf_variant not in IDF_VARIANTS:
            raise UserError(f"idf variant {idf_variant!r}: expected one of {', '.join(IDF_VARIANTS)}")
        if k1 < 0 or not 0 <= b <= 1:
            raise UserError(f"k1 must be >= 0 and b in [0, 1], got k1={k1}, b={b}")
        term_id: dict[str, int] = {}
        shard_terms, shard_docs_, shard_tfs, lengths = [], [], [], []
        shard: list[Sequence[str]] = []

        def flush():
            # One shard's (term, doc) pairs counted by one np.unique over term * n + local doc.
            ids = np.fromiter((term_id.setdefault(t, len(term_id)) for doc in shard for t in doc),
                              dtype=np.int64)
            n_tokens = np.fromiter((len(doc) for doc in shard), dtype=np.int64, count=len(shard))
            local = np.repeat(np.arange(len(shard), dtype=np.int64), n_tokens)
            keys, counts = np.unique(ids * len(shard) + local, return_counts=True)
            shard_terms.append(keys // len(shard))
            shard_docs_.append(keys % len(shard) + sum(len(x) for x in lengths))
            shard_tfs.append(counts.astype(np.int32))
            lengths.append(n_tokens)
            shard.clear()

        for doc in documents:
            shard.append(tokenize(doc) if isinstance(doc, str) else doc)
            if len(shard) == shard_docs:
                flush()
        if shard:
            flush()
        # Merge: a stable sort by term keeps each term's documents ascending (shards are in order).
        terms = np.concatenate(shard_terms) if shard_terms else np.zeros(0, np.int64)
        order = np.argsort(terms, kind="stable")
        doc_ids = (np.concatenate(shard_docs_)[order] if shard_docs_ else terms).astype(np.int32)
        tfs = np.concatenate(shard_tfs)[order] if shard_tfs else np.zeros(0, np.int32)
        df = np.bincount(terms, minlength=len(term_id))
        indptr = np.concatenate([[0], np.cumsum(df)]).astype(np.int64)
        doc_lengths = (np.concatenate(lengths) if lengths else np.zeros(0, np.int64)).astype(np.int32)
        weights = _weights(df, indptr, doc_ids, tfs, doc_lengths, k1, b, idf_variant)
        return cls(list(term_id), indptr, doc_ids, tfs, weights, doc_lengths, k1, b, idf_variant,
                   tokenizer)

    # --- saving ---------------------------------------------------------------------------------

    _ARRAYS = ("indptr", "doc_ids", "tfs", "weights", "doc_lengths")

    def save(self, directory: str | Path) -> None:
        """Write the arrays as .npy files and the vocabulary and parameters as meta.json (last)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name in self._ARRAYS:
            np.save(directory / f"{name}.npy", getattr(self, name))
        meta = {"format": FORMAT, "k1": self.k1, "b": self.b, "idf_variant": self.idf_variant,
                "tokenizer": self.tokenizer, "num_docs": self.num_docs, "vocab": self.vocab}
        write_json(directory / "meta.json", meta)

    @classmethod
    def load(cls, directory: str | Path, mmap: bool = True,
             tokenize: Callable[[str], list[str]] | None = None) -> "BM25Index":
        """Open a saved index; the arrays are memory-mapped unless `mmap=False`. An index built
        with another tokenizer than "word" needs that `tokenize` again to take text queries."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{directory}: not a BM25 index (no readable meta.json: {e})") from None
        if meta.get("format") != FORMAT:
            raise UserError(f"{directory}: format {meta.get('format')!r}, expected {FORMAT!r}")
        arrays = {name: np.load(directory / f"{name}.npy", mmap_mode="r" if mmap else None)
                  for name in cls._ARRAYS}
        index = cls(meta["vocab"], k1=meta["k1"], b=meta["b"], idf_variant=meta["idf_variant"],
                    tokenizer=meta["tokenizer"], **arrays)
        if tokenize is not None:
            index.tokenize = tokenize
        return index

    # --- searching ------------------------------------------------------------------------------

    def query_terms(self, query: str | Sequence[str]) -> list[int]:
        """Term ids of a query's known tokens (unknown tokens are dropped; repeats kept)."""
        tokens = self.tokenize(query) if isinstance(query, str) else query
        return [i for i in map(self.term_id.get, tokens) if i is not None]

    def scores(self, query: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(matched document ids, their scores), in no particular order."""
        terms = self.query_terms(query)
        acc, seen, indptr = self._acc, self._seen, self.indptr
        parts = []
        for t in terms:
            lo, hi = indptr[t], indptr[t + 1]
            docs = self.doc_ids[lo:hi]
            acc[docs] += self.weights[lo:hi]  # docs are distinct within one term's postings
            parts.append(docs[~seen[docs]])
            seen[docs] = True
        if not parts:
            return np.zeros(0, np.int32), np.zeros(0, np.float64)
        matched = np.concatenate(parts) if len(parts) > 1 else parts[0]
        scores = acc[matched]
        acc[matched] = 0.0
        seen[matched] = False
        return matched, scores

    def search(self, query: str | Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(document ids, scores) of the top `k` matched documents; see the module's contract."""
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        docs, scores = self.scores(query)
        if len(docs) > k:
            # Keep every document that ties with the k-th score, then break ties by id.
            kth = -np.partition(-scores, k - 1)[k - 1]
            keep = scores >= kth
            docs, scores = docs[keep], scores[keep]
        order = np.lexsort((docs, -scores))[:k]
        return docs[order].astype(np.int64), scores[order]

    def search_batch(self, queries: Sequence[str | Sequence[str]], k: int = 10
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for each query."""
        return [self.search(q, k) for q in queries]


def _weights(df, indptr, doc_ids, tfs, doc_lengths, k1, b, idf_variant) -> np.ndarray:
    """BM25 weight of every posting (term, document), float64."""
    n_docs = len(doc_lengths)
    if len(doc_ids) == 0:
        return np.zeros(0, np.float64)
    avg_len = float(doc_lengths.mean())
    term_idf = idf(idf_variant, df, n_docs)
    tf = tfs.astype(np.float64)
    norm = k1 * (1.0 - b + b * doc_lengths[doc_ids].astype(np.float64) / avg_len)
    scale = k1 + 1.0 if idf_variant == "atire" else 1.0
    return np.repeat(term_idf, np.diff(indptr)) * (tf * scale / (tf + norm))


def brute_force_scores(documents: Sequence[Sequence[str]], query: Sequence[str], k1: float = 1.5,
                       b: float = 0.75, idf_variant: str = "lucene") -> dict[int, float]:
    """The formula evaluated one document at a time in plain Python: {doc id: score} of every
    document that holds a query token. The reference the index is tested against."""
    n = len(documents)
    avg_len = sum(map(len, documents)) / n if n else 0.0
    df: dict[str, int] = {}
    for doc in documents:
        for t in set(doc):
            df[t] = df.get(t, 0) + 1
    scale = k1 + 1.0 if idf_variant == "atire" else 1.0
    out = {}
    for d, doc in enumerate(documents):
        total, matched = 0.0, False
        for t in query:
            tf = doc.count(t)
            if tf:
                term_idf = float(idf(idf_variant, df[t], n))
                norm = k1 * (1.0 - b + b * len(doc) / avg_len)
                total += term_idf * (tf * scale / (tf + norm))
                matched = True
        if matched:
            out[d] = total
    return out


def brute_force_top(documents, query, k=10, **kw) -> list[tuple[int, float]]:
    """The top k of `brute_force_scores`, by score descending then document id."""
    return sorted(brute_force_scores(documents, query, **kw).items(), key=lambda x: (-x[1], x[0]))[:k]


__all__ = ["BM25Index", "IDF_VARIANTS", "brute_force_scores", "brute_force_top", "idf",
           "word_tokenize"]
