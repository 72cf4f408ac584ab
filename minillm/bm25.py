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

Search: the exact top k by one of two evaluations, which return the same documents and bit-identical
scores (each sums a document's weights in query order, as the brute-force reference does):

- exhaustive, term at a time: every posting of every query term is added into a scratch array at
  its document; the touched documents are read back, ranked and cleared. It costs the postings of
  the query's terms, never a pass over all documents' scores.
- MaxScore (Turtle and Flood 1995, "Query evaluation: strategies and optimizations"): a term's
  largest weight (`max_weight`) bounds what it adds to any document. Order the query's distinct
  terms by that bound, largest first; the documents of the first few ("essential") terms are the
  candidates, scored exactly by looking every query term up in its ascending postings. A document
  holding no essential term scores at most R = the sum, in query order, of max(0, bound) over the
  other terms' occurrences (rounding is monotone, so this also bounds the float sums). If the k-th
  best candidate scores above R, no other document can reach the top k, not even by a tie;
  otherwise one more term becomes essential. A query of one rare word and a few common ones ("the",
  "and") then scores the rare word's documents instead of most of the corpus. It is tried only while
  the candidates' postings are under 1/`prune_ratio` of the query's postings.

Both evaluations exist twice: in numpy (always available) and as plain loops compiled by numba when
it is installed (`pip install numba`; `index.use_numba` says which runs), a whole batch of queries
per call. Tests hold both to each other and to the brute-force scorer. `docs_scored` tells, per
query of the last search, how many documents were scored (candidates, or every matched document).
The scratch arrays belong to the index object: searches from several threads need one object each.

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

try:
    import numba
except ImportError:  # optional: the numpy search serves alone
    numba = None

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
        # Each term's largest weight: what it can add to any document's score (MaxScore's bound).
        self.max_weight = (np.maximum.reduceat(weights, indptr[:-1]) if len(weights)
                           else np.zeros(len(vocab)))
        self.prune_ratio = 16.0  # try MaxScore while its candidates' postings are < 1/16 of all
        self.use_numba = numba is not None
        self.docs_scored = np.zeros(0, dtype=np.int64)         # per query of the last search
        self._acc = np.zeros(self.num_docs, dtype=np.float64)  # scratch: scores of one query
        self._seen = np.zeros(self.num_docs, dtype=bool)       # scratch: its matched documents
        self._touched: np.ndarray | None = None                # scratch of the compiled search
        self._cand_scores: np.ndarray | None = None

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
        return self._scatter(self.query_terms(query))

    def search(self, query: str | Sequence[str], k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(document ids, scores) of the top `k` matched documents; see the module's contract."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: Sequence[str | Sequence[str]], k: int = 10
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for each query: one compiled call for the batch when `use_numba`."""
        if k < 1:
            raise UserError(f"k must be >= 1, got {k}")
        terms = [self.query_terms(q) for q in queries]
        if not self.use_numba:
            out = [self._search_numpy(t, k) for t in terms]
            self.docs_scored = np.array([n for _, _, n in out], dtype=np.int64)
            return [(ids, scores) for ids, scores, _ in out]
        if numba is None:
            raise UserError("use_numba needs numba (pip install numba)")
        return self._search_compiled(terms, k)

    # numpy search: MaxScore where it pays, else every matched document

    def _search_numpy(self, terms: list[int], k: int) -> tuple[np.ndarray, np.ndarray, int]:
        found = self._maxscore(terms, k)
        docs, scores = found if found is not None else self._scatter(terms)
        n_scored = len(docs)
        if len(docs) > k:
            # Keep every document that ties with the k-th score, then break ties by id.
            kth = -np.partition(-scores, k - 1)[k - 1]
            keep = scores >= kth
            docs, scores = docs[keep], scores[keep]
        order = np.lexsort((docs, -scores))[:k]
        return docs[order].astype(np.int64), scores[order], n_scored

    def _scatter(self, terms: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """Every matched document and its score: the postings added term by term into scratch."""
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

    def _maxscore(self, terms: list[int], k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(candidates, their scores) proven to hold the top k, or None (then score everything)."""
        df = {t: int(self.indptr[t + 1] - self.indptr[t]) for t in terms}
        all_postings = sum(df[t] for t in terms)
        if all_postings < self.prune_ratio * k:
            return None  # k candidates would be more than 1/prune_ratio of the postings
        by_bound = sorted(df, key=lambda t: -self.max_weight[t])
        essential_postings = 0
        for n_essential in range(1, len(by_bound)):
            essential = by_bound[:n_essential]
            essential_postings += df[essential[-1]]
            if essential_postings * self.prune_ratio > all_postings:
                return None  # the candidates would cost about as much as every posting
            cands = (self._postings(essential[0])[0] if n_essential == 1 else
                     np.unique(np.concatenate([self._postings(t)[0] for t in essential])))
            if len(cands) < k:
                continue
            scores = np.zeros(len(cands))
            for t in terms:  # query order, as every evaluation sums
                docs, weights = self._postings(t)
                at = np.minimum(np.searchsorted(docs, cands), len(docs) - 1)
                hit = docs[at] == cands
                scores[hit] += weights[at[hit]]
            bound = 0.0  # what a document holding no essential term can score, at most
            for t in terms:
                if t not in essential:
                    bound += max(0.0, float(self.max_weight[t]))
            if bound < -np.partition(-scores, k - 1)[k - 1]:
                return cands, scores
        return None

    def _postings(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.indptr[t], self.indptr[t + 1]
        return self.doc_ids[lo:hi], self.weights[lo:hi]

    # compiled search: the same two evaluations as loops, a batch per call

    def _search_compiled(self, terms: list[list[int]], k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        k = min(k, self.num_docs)
        if self._touched is None:
            self._touched = np.zeros(self.num_docs, dtype=np.int32)
            self._cand_scores = np.zeros(self.num_docs, dtype=np.float64)
        query_starts = np.zeros(len(terms) + 1, dtype=np.int64)
        np.cumsum([len(t) for t in terms], out=query_starts[1:])
        terms_flat = np.fromiter((t for ts in terms for t in ts), np.int64, count=query_starts[-1])
        top_docs_QK = np.zeros((len(terms), k), dtype=np.int64)
        top_scores_QK = np.zeros((len(terms), k), dtype=np.float64)
        n_top_Q = np.zeros(len(terms), dtype=np.int64)
        self.docs_scored = np.zeros(len(terms), dtype=np.int64)
        if k > 0:
            _top_k_kernel(*map(_read_only, (self.indptr, self.doc_ids, self.weights, self.max_weight)),
                          terms_flat, query_starts, k, float(self.prune_ratio),
                          self._acc, self._seen, self._touched, self._cand_scores,
                          top_docs_QK, top_scores_QK, n_top_Q, self.docs_scored)
        return [(top_docs_QK[q, :n], top_scores_QK[q, :n]) for q, n in enumerate(n_top_Q.tolist())]


# --- compiled search (numba, optional) ------------------------------------------------------------
# Plain loops over the postings, the numpy search's two evaluations written out; numba compiles them
# where it is installed (cached beside this file), and BM25Index.search_batch calls them then.

def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only plain-ndarray view (no copy): built and memory-mapped indexes then share one
    compiled signature instead of compiling twice."""
    view = np.asarray(a).view()
    view.flags.writeable = False
    return view


def _compiled(fn):
    return numba.njit(cache=True, nogil=True)(fn) if numba is not None else fn


@_compiled
def _push(top_docs, top_scores, n, k, doc, score):
    """Insert (doc, score) into the first n entries, kept by score descending then id; the
    caller has checked that it belongs in the top k. Returns the new count (at most k)."""
    if n < k:
        n += 1
    i = n - 1
    while i > 0 and (score > top_scores[i - 1]
                     or (score == top_scores[i - 1] and doc < top_docs[i - 1])):
        top_scores[i], top_docs[i] = top_scores[i - 1], top_docs[i - 1]
        i -= 1
    top_scores[i], top_docs[i] = score, doc
    return n


@_compiled
def _maxscore_kernel(indptr, doc_ids, weights, max_weight, query, k, prune_ratio, seen, touched,
                     cand_scores, top_docs, top_scores):
    """`BM25Index._maxscore` as loops, the top k written out: (n found, n scored), or (-1, 0)."""
    # Distinct terms by bound, largest first (insertion sort: queries are short).
    by_bound = np.empty(len(query), dtype=np.int64)
    n_distinct = 0
    for t in query:
        if t in by_bound[:n_distinct]:
            continue
        i = n_distinct
        while i > 0 and max_weight[by_bound[i - 1]] < max_weight[t]:
            by_bound[i] = by_bound[i - 1]
            i -= 1
        by_bound[i] = t
        n_distinct += 1
    all_postings = 0
    for t in query:
        all_postings += indptr[t + 1] - indptr[t]
    essential_postings = 0
    for n_essential in range(1, n_distinct):
        t = by_bound[n_essential - 1]
        essential_postings += indptr[t + 1] - indptr[t]
        if essential_postings * prune_ratio > all_postings:
            return -1, 0
        # Candidates: the union of the essential terms' postings, ascending.
        n_cands = 0
        for t in by_bound[:n_essential]:
            for p in range(indptr[t], indptr[t + 1]):
                if not seen[doc_ids[p]]:
                    seen[doc_ids[p]] = True
                    touched[n_cands] = doc_ids[p]
                    n_cands += 1
        cands = touched[:n_cands]
        seen[cands] = False
        if n_cands < k:
            continue
        if n_essential > 1:
            cands.sort()
        # Their scores, term by term in query order: a merge of two ascending lists, galloping
        # through the postings (a common term's are long, the candidates few).
        cand_scores[:n_cands] = 0.0
        for t in query:
            p, end = indptr[t], indptr[t + 1]
            for c in range(n_cands):
                if doc_ids[p] < cands[c]:
                    step = 1
                    while p + step < end and doc_ids[p + step] < cands[c]:
                        p += step
                        step *= 2
                    # doc_ids[lo] < cands[c] <= doc_ids[hi] (or hi is the end): bisect.
                    lo, hi = p, min(p + step, end)
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if doc_ids[mid] < cands[c]:
                            lo = mid
                        else:
                            hi = mid
                    p = hi
                    if p == end:
                        break
                if doc_ids[p] == cands[c]:
                    cand_scores[c] += weights[p]
        n_top = 0
        for c in range(n_cands):  # ascending ids: a tie never displaces an earlier document
            if n_top < k or cand_scores[c] > top_scores[k - 1]:
                n_top = _push(top_docs, top_scores, n_top, k, cands[c], cand_scores[c])
        bound = 0.0
        for t in query:
            if t not in by_bound[:n_essential]:
                bound += max(0.0, max_weight[t])
        if bound < top_scores[k - 1]:
            return n_top, n_cands
    return -1, 0


@_compiled
def _exhaustive_kernel(indptr, doc_ids, weights, query, k, acc, seen, touched, top_docs,
                       top_scores):
    """Every matched document scored, the top k written out: (n found, n matched)."""
    all_postings = 0
    for t in query:
        all_postings += indptr[t + 1] - indptr[t]
    num_docs = len(acc)
    n_top = 0
    if all_postings * 4 < num_docs:
        # Few postings: remember the documents touched and visit only those (in first-touch
        # order, so ties are compared by id).
        n_touched = 0
        for t in query:
            for p in range(indptr[t], indptr[t + 1]):
                d = doc_ids[p]
                if not seen[d]:
                    seen[d] = True
                    touched[n_touched] = d
                    n_touched += 1
                acc[d] += weights[p]
        for d in touched[:n_touched]:
            score = acc[d]
            acc[d], seen[d] = 0.0, False
            if n_top < k or score > top_scores[k - 1] or (score == top_scores[k - 1]
                                                           and d < top_docs[k - 1]):
                n_top = _push(top_docs, top_scores, n_top, k, d, score)
        return n_top, n_touched
    # Many: add without bookkeeping, then one pass over all documents in id order (a branch-free
    # add and a predictable scan beat a touched list once postings cover a quarter of the corpus).
    for t in query:
        for p in range(indptr[t], indptr[t + 1]):
            seen[doc_ids[p]] = True
            acc[doc_ids[p]] += weights[p]
    n_matched = 0
    for d in range(num_docs):
        score = acc[d]
        if n_top < k or score > top_scores[k - 1]:  # rarely true: the branch predicts well
            if seen[d]:
                n_top = _push(top_docs, top_scores, n_top, k, d, score)
        n_matched += seen[d]
        acc[d], seen[d] = 0.0, False
    return n_top, n_matched


@_compiled
def _top_k_kernel(indptr, doc_ids, weights, max_weight, terms_flat, query_starts, k, prune_ratio,
                  acc, seen, touched, cand_scores, top_docs_QK, top_scores_QK, n_top_Q,
                  docs_scored_Q):
    """Query q is terms_flat[query_starts[q]:query_starts[q + 1]]; its top k go to row q."""
    for q in range(len(query_starts) - 1):
        query = terms_flat[query_starts[q]:query_starts[q + 1]]
        n_top, n_scored = _maxscore_kernel(indptr, doc_ids, weights, max_weight, query, k,
                                           prune_ratio, seen, touched, cand_scores,
                                           top_docs_QK[q], top_scores_QK[q])
        if n_top < 0:
            n_top, n_scored = _exhaustive_kernel(indptr, doc_ids, weights, query, k, acc, seen,
                                                 touched, top_docs_QK[q], top_scores_QK[q])
        n_top_Q[q], docs_scored_Q[q] = n_top, n_scored


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
