"""The WanJuan-CC pipeline over shards: four stages that communicate only through files.

    filter   (per shard)  read -> extract -> language -> rules; MinHash signatures, band hashes
    pairs    (per band)   candidate pairs of one LSH band across all shards, verified by signature
    clusters (once)       union-find over the verified pairs -> documents to remove, per shard
    finish   (per shard)  drop duplicates -> safety -> quality scores -> gzip JSONL + token shards

Rank r of W takes shards (and bands) r, r + W, ...; the same code runs on one core, in a local
process pool (`run`), or as separate processes (torchrun, Slurm arrays) with a shared file system,
where each stage waits for the files of the previous one. No stage holds all documents: `pairs`
loads one band column (8 bytes a document), `clusters` only the verified pairs.

Every output is written to a temporary name and renamed, and a `.done` marker is written last: a
rerun skips completed shards and redoes interrupted ones from scratch, so an interrupted run ends
with the same files as an uninterrupted one.

Nothing in the input stops the run, and nothing is lost without a count. A record that cannot be
read, or a document on which a stage raises, is counted under `unreadable` with its reason, and
`report.json` lists the files and first errors; with `strict` the run fails at the first such
record instead. Per-document limits (size, nesting depth, CPU time; see `limits.py`) reject with
their own reasons. The report balances: records read = kept + rejected + skipped + unreadable, each
by reason (`skipped`: records that are not documents, such as requests, PDFs and redirects).

Local workers (`workers` > 1) are one process pool for the whole run, fed shard by shard. Nothing
here imports torch unless a quality model (classifier or perplexity) is asked for.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ...errors import UserError
from ...fileio import atomic_write
from .extract import choose_encoding, extract_text
from .language import LanguageFilter
from .limits import CpuTimeLimit, DocumentLimit, nesting_depth
from ...minhash import MinHasher, UnionFind, band_hashes, jaccard_estimate, lsh_params
from .read import MAX_DOCUMENT_BYTES, Dropped, Shard, list_shards, read_shard
from .rules import RuleSet
from .safety import SafetyFilter, host_of

STAGES = ("filter", "pairs", "clusters", "finish")
MAX_ERRORS_KEPT = 20  # error details kept per shard for the report


class InputError(UserError):
    """Under `strict`: a record that cannot be read, named by file and place."""


@dataclass
class PipelineConfig:
    inputs: list[str] = field(default_factory=list, metadata={"help": "WARC / JSONL files or folders"})
    out_dir: str = field(default="out/wanjuan_cc", metadata={"help": "work and output folder"})
    text_field: str = "text"
    extractor: str = field(default="stdlib", metadata={"help": "stdlib or resiliparse"})
    languages: list[str] = field(default_factory=lambda: ["en"])
    min_language_confidence: float = 0.3
    rules_json: str | None = field(default=None, metadata={"help": "JSON of RuleSet thresholds"})
    dedup_threshold: float = field(default=0.8, metadata={"help": "Jaccard of near-duplicates to remove"})
    verify_threshold: float = field(default=0.7, metadata={
        "help": "estimated Jaccard a candidate pair must reach (below dedup_threshold: MinHash "
                "estimates are noisy, about +-0.035 at 0.8 with 128 permutations)"})
    num_perm: int = 128
    ngram: int = 5
    blocked_domains: str | None = field(default=None, metadata={"help": "file: one domain per line"})
    blocked_keywords: str | None = field(default=None, metadata={"help": "JSON {keyword: weight}"})
    ad_model: str | None = field(default=None, metadata={"help": "HashedNgramClassifier: 1 = not ad"})
    fluency_model: str | None = field(default=None, metadata={"help": "HashedNgramClassifier: 1 = fluent"})
    perplexity_model: str | None = field(default=None, metadata={"help": "minillm checkpoint"})
    tokenizer: str | None = field(default=None, metadata={"help": "also write token shards"})
    max_document_bytes: int = field(default=MAX_DOCUMENT_BYTES, metadata={
        "help": "larger HTML / text documents are rejected (limit:size) without being held in memory"})
    max_depth: int = field(default=512, metadata={
        "help": "HTML nested deeper is rejected (limit:depth) before parsing (browsers cap the DOM at 512)"})
    max_seconds: float = field(default=5.0, metadata={
        "help": "CPU seconds one document may take in extract, language and rules (limit:time); 0: none"})
    strict: bool = field(default=False, metadata={
        "help": "fail on the first unreadable record or processing error instead of counting it"})
    rank: int | None = None
    world_size: int | None = None
    workers: int = field(default=1, metadata={"help": "local processes (when not launched as ranks)"})
    stage: str = field(default="all", metadata={"help": "all, or one of " + ", ".join(STAGES)})
    wait_timeout_s: float = 3600.0


def rank_and_world(cfg: PipelineConfig) -> tuple[int, int]:
    """Explicit flags, else torchrun's RANK / WORLD_SIZE, else Slurm's array or task ids."""
    if cfg.rank is not None and cfg.world_size is not None:
        return cfg.rank, cfg.world_size
    env = os.environ
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                 ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in env and w in env:
            return int(env[r]), int(env[w])
    return 0, 1


# --- files ---------------------------------------------------------------------------------------------

def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.save(tmp, array), suffix=".npy")


def _write_jsonl_gz(path: Path, records: list[dict], level: int = 4) -> None:
    # mtime=0: identical content gives identical bytes, run after run
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    _atomic_write(path, gzip.compress(payload.encode("utf-8", "replace"), level, mtime=0))


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _words(text: str) -> int:
    return len(text.split())


class Pipeline:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.shards = list_shards(cfg.inputs)
        self.bands, self.rows = lsh_params(cfg.num_perm, cfg.verify_threshold)
        rules = json.loads(Path(cfg.rules_json).read_text()) if cfg.rules_json else {}
        self.rules = RuleSet(**rules)
        self.language = LanguageFilter(cfg.languages, cfg.min_language_confidence)
        self.hasher = MinHasher(cfg.num_perm, cfg.ngram)

    # --- paths ---
    def path(self, stage: str, index: int, suffix: str) -> Path:
        return self.out / stage / f"{index:05d}{suffix}"

    def done(self, stage: str, index: int) -> Path:
        return self.path(stage, index, ".done")

    def _wait(self, markers: list[Path]) -> None:
        deadline = time.time() + self.cfg.wait_timeout_s
        while not all(m.exists() for m in markers):
            if time.time() > deadline:
                missing = [str(m) for m in markers if not m.exists()][:3]
                raise TimeoutError(f"waited {self.cfg.wait_timeout_s} s for {missing} ...")
            time.sleep(1.0)

    # --- stage 1: filter ---
    def _filter_document(self, record: dict) -> tuple[str | None, int]:
        """Extract, limits, language and rules for one document: (None to keep it, else the reason;
        words of the extracted text). Sets `text` (and `title`, `domain`, language) on `record`."""
        if isinstance(record.get("html"), bytes):  # from a WARC (a JSONL record's fields are its own)
            raw, content_type = record.pop("html"), record.pop("content_type", None)
            encoding = choose_encoding(raw, content_type)
            html = raw.decode(encoding, "replace") if encoding else None
            if html is None:
                try:
                    html = raw.decode("utf-8")
                except UnicodeDecodeError:
                    html = raw.decode("cp1252", "replace")
            scanned = raw if encoding is None or not encoding.startswith("utf-16") else html.encode()
            if nesting_depth(scanned) > self.cfg.max_depth:
                return "limit:depth", 0
            record["text"], record["title"] = extract_text(html, backend=self.cfg.extractor)
        url = record.get("url")
        if isinstance(url, str) and url:
            record["domain"] = host_of(url)
        words = _words(record["text"])
        if not words:
            return "extract:empty", 0
        return self.language(record) or self.rules.apply(record), words

    def filter_shard(self, index: int) -> None:
        shard: Shard = self.shards[index]
        stats = {"shard": shard.name, "read": 0, "documents": 0, "read_words": 0, "kept_words": 0,
                 "rejected": Counter(),
                 "skipped": Counter(), "unreadable": Counter(), "errors": []}
        kept = []
        with CpuTimeLimit(self.cfg.max_seconds) as limit:
            for record in read_shard(shard, self.cfg.text_field, self.cfg.max_document_bytes):
                stats["read"] += 1
                if isinstance(record, Dropped):
                    stats[record.kind][record.reason] += 1
                    if record.kind == "unreadable":
                        self._error(stats, record.reason, record.detail)
                    continue
                stats["documents"] += 1
                try:
                    limit.start()
                    reason, words = self._filter_document(record)
                    limit.stop()
                except DocumentLimit as e:
                    limit.stop()
                    reason = e.reason
                except Exception as e:  # noqa: BLE001 - one page that breaks a stage costs that page
                    limit.stop()
                    if self.cfg.strict:
                        raise
                    reason = f"error:filter:{type(e).__name__}"
                    self._error(stats, reason, f"{shard.name}: record {record.get('id')!r}: {e}")
                    stats["unreadable"][reason] += 1
                    continue
                if reason:
                    stats["rejected"][reason] += 1
                else:
                    kept.append(record)
                    stats["kept_words"] += (words if "boilerplate_lines_removed" not in record
                                            else _words(record["text"]))
                stats["read_words"] += words
        signatures = self.hasher.signatures([r["text"] for r in kept])
        exact = np.array([int.from_bytes(hashlib.blake2b(r["text"].encode("utf-8", "replace"),
                                                         digest_size=8).digest(), "little")
                          for r in kept], dtype=np.uint64)
        bands = np.concatenate([band_hashes(signatures, self.bands, self.rows), exact[:, None]], axis=1)
        stats["kept"] = len(kept)
        _write_jsonl_gz(self.path("filter", index, ".jsonl.gz"), kept, level=1)
        _save_npy(self.path("filter", index, ".sig.npy"), signatures)
        _save_npy(self.path("filter", index, ".bands.npy"), bands)
        _atomic_write(self.path("filter", index, ".stats.json"), json.dumps(stats).encode())
        _atomic_write(self.done("filter", index), b"")

    def _error(self, stats: dict, reason: str, detail: str) -> None:
        """Note an unreadable record; under `strict`, fail the run with it."""
        if self.cfg.strict:
            raise InputError(f"{detail} ({reason}; without --strict it is counted and skipped)")
        if len(stats["errors"]) < MAX_ERRORS_KEPT:
            stats["errors"].append({"reason": reason, "detail": detail})

    # --- stage 2: pairs ---
    def pairs_for_band(self, band: int) -> None:
        """Verified pairs (global ids shard << 32 | row) of documents whose `band` hash agrees.
        Band `self.bands` is the exact content hash: its pairs need no verification."""
        hashes, ids = [], []
        for k in range(len(self.shards)):
            column = np.load(self.path("filter", k, ".bands.npy"), mmap_mode="r")[:, band]
            hashes.append(np.asarray(column))
            ids.append((np.int64(k) << 32) + np.arange(len(column), dtype=np.int64))
        hashes, ids = np.concatenate(hashes), np.concatenate(ids)
        order = np.argsort(hashes, kind="stable")
        hashes, ids = hashes[order], ids[order]
        same = np.flatnonzero(hashes[1:] == hashes[:-1])  # i and i + 1 share a bucket
        first = ids[np.searchsorted(hashes, hashes[same + 1])]  # each bucket's first member
        a, b = first, ids[same + 1]
        if band < self.bands and len(a):
            sig_cache: dict[int, np.ndarray] = {}

            def sigs(gids):
                out = np.empty((len(gids), self.cfg.num_perm), dtype=np.uint32)
                for k in np.unique(gids >> 32):
                    if k not in sig_cache:
                        sig_cache[k] = np.load(self.path("filter", int(k), ".sig.npy"), mmap_mode="r")
                    sel = (gids >> 32) == k
                    out[sel] = sig_cache[k][gids[sel] & 0xFFFFFFFF]
                return out

            ok = jaccard_estimate(sigs(a), sigs(b)) >= self.cfg.verify_threshold
            a, b = a[ok], b[ok]
        _save_npy(self.path("pairs", band, ".npy"), np.stack([a, b], axis=1) if len(a)
                  else np.zeros((0, 2), dtype=np.int64))
        _atomic_write(self.done("pairs", band), b"")

    # --- stage 3: clusters ---
    def clusters(self) -> None:
        uf = UnionFind()
        for band in range(self.bands + 1):
            for x, y in np.load(self.path("pairs", band, ".npy")).tolist():
                uf.union(x, y)
        removed: dict[int, list[int]] = {}
        roots = Counter()
        for x in list(uf.parent):
            root = uf.find(x)
            if x != root:
                removed.setdefault(x >> 32, []).append(x & 0xFFFFFFFF)
                roots[root] += 1
        for k in range(len(self.shards)):
            _save_npy(self.path("clusters", k, ".removed.npy"), np.array(sorted(removed.get(k, [])),
                                                                        dtype=np.int64))
        summary = {"clusters": len(roots), "removed": sum(roots.values()),
                   "largest_cluster": (max(roots.values()) + 1) if roots else 0}
        _atomic_write(self.out / "clusters" / "summary.json", json.dumps(summary).encode())
        _atomic_write(self.out / "clusters" / "all.done", b"")

    # --- stage 4: finish ---
    @functools.cached_property
    def scorers(self):
        """(safety filter, ad classifier, fluency classifier, perplexity scorer), loaded once per
        process. The quality models need torch, imported only when one is asked for."""
        cfg = self.cfg
        ad = fluency = ppl = None
        if cfg.ad_model or cfg.fluency_model or cfg.perplexity_model:
            from .quality import HashedNgramClassifier, PerplexityScorer  # torch: only when asked for
            ad = HashedNgramClassifier.load(cfg.ad_model) if cfg.ad_model else None
            fluency = HashedNgramClassifier.load(cfg.fluency_model) if cfg.fluency_model else None
            if cfg.perplexity_model:
                from ...generate import LocalLM
                from ...checkpoint import load_model
                model, tok, _ = load_model(cfg.perplexity_model)
                ppl = PerplexityScorer(LocalLM(model.eval(), tok))
        blocked = set(Path(cfg.blocked_domains).read_text().split()) if cfg.blocked_domains else set()
        keywords = json.loads(Path(cfg.blocked_keywords).read_text()) if cfg.blocked_keywords else None
        return SafetyFilter(blocked, keywords), ad, fluency, ppl

    def finish_shard(self, index: int) -> None:
        safety, ad, fluency, ppl = self.scorers
        records = read_jsonl_gz(self.path("filter", index, ".jsonl.gz"))
        removed = set(np.load(self.path("clusters", index, ".removed.npy")).tolist())
        stats = {"in": len(records), "duplicates": len(removed), "rejected": Counter(),
                 "unreadable": Counter(), "errors": []}
        out = []
        for row, record in enumerate(records):
            if row in removed:
                continue
            try:
                reason = safety(record)
            except Exception as e:  # noqa: BLE001 - as in filter_shard: the record, not the run
                if self.cfg.strict:
                    raise
                reason = f"error:safety:{type(e).__name__}"
                stats["unreadable"][reason] += 1
                if len(stats["errors"]) < MAX_ERRORS_KEPT:
                    stats["errors"].append({"reason": reason, "detail": f"record {record.get('id')!r}: {e}"})
                continue
            if reason:
                stats["rejected"][reason] += 1
                continue
            out.append(record)
        texts = [r["text"] for r in out]
        for name, scorer in (("not_ad_score", ad), ("fluency_score", fluency)):
            values = scorer.predict_proba(texts).tolist() if scorer and texts else [None] * len(out)
            for r, v in zip(out, values):
                r[name] = None if v is None else round(v, 4)
        if ppl is not None and texts:
            for r, v in zip(out, ppl(texts)):
                r["perplexity"] = round(v, 3)
        stats["out"], stats["out_words"] = len(out), sum(_words(t) for t in texts)
        _write_jsonl_gz(self.path("final", index, ".jsonl.gz"), out)
        if self.cfg.tokenizer:
            from ...data import ShardWriter
            from ...hf import load_any_tokenizer
            tok = load_any_tokenizer(self.cfg.tokenizer)
            tokens_dir = self.out / "tokens"
            for stale in tokens_dir.glob(f"train{index:05d}_*.bin"):
                stale.unlink()
            with ShardWriter(tokens_dir, f"train{index:05d}", tok.vocab_size, tok.eot_id) as w:
                for ids in tok.encode_ordinary_batch(texts):
                    w.add(ids)
            stats["tokens"] = w.num_tokens
        _atomic_write(self.path("final", index, ".stats.json"), json.dumps(stats).encode())
        _atomic_write(self.done("final", index), b"")

    # --- driving the stages ---
    def todo(self, stage: str, rank: int = 0, world: int = 1) -> list[int]:
        """This rank's unfinished work items of `stage`: shard or band indices."""
        if stage in ("filter", "finish"):
            name = "filter" if stage == "filter" else "final"
            return [k for k in range(rank, len(self.shards), world) if not self.done(name, k).exists()]
        if stage == "pairs":
            return [b for b in range(rank, self.bands + 1, world) if not self.done("pairs", b).exists()]
        if stage == "clusters":
            return [0] if rank == 0 and not (self.out / "clusters" / "all.done").exists() else []
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def wait_for(self, stage: str) -> None:
        """Wait until the stage before `stage` is done on every rank."""
        if stage == "pairs":
            self._wait([self.done("filter", k) for k in range(len(self.shards))])
        elif stage == "clusters":
            self._wait([self.done("pairs", b) for b in range(self.bands + 1)])
        elif stage == "finish":
            self._wait([self.out / "clusters" / "all.done"])

    def run_item(self, stage: str, index: int) -> None:
        {"filter": self.filter_shard, "pairs": self.pairs_for_band, "finish": self.finish_shard,
         "clusters": lambda _: self.clusters()}[stage](index)

    def run_stage(self, stage: str, rank: int, world: int, progress: bool = False) -> None:
        todo = self.todo(stage, rank, world)
        self.wait_for(stage)
        for k in tqdm(todo, desc=f"{stage} (rank {rank})", disable=not progress or len(todo) < 2):
            self.run_item(stage, k)

    def report(self) -> dict:
        """Aggregate the per-shard statistics into `report.json` (written when all shards are done).
        read = kept + sum(rejected) + sum(skipped) + sum(unreadable), checked here."""
        filt = [json.loads(self.path("filter", k, ".stats.json").read_text()) for k in range(len(self.shards))]
        fin = [json.loads(self.path("final", k, ".stats.json").read_text()) for k in range(len(self.shards))]
        if any("documents" not in s for s in filt) or any("unreadable" not in s for s in fin):
            raise UserError(f"{self.out} holds shards finished by an older minillm that did not account "
                            "for every record: use a fresh --out-dir")
        rejected, skipped, unreadable = Counter(), Counter(), Counter()
        for s in filt + fin:
            rejected.update(s["rejected"])
            unreadable.update(s.get("unreadable", {}))
        for s in filt:
            skipped.update(s.get("skipped", {}))
        duplicates = sum(s["duplicates"] for s in fin)
        if duplicates:
            rejected["duplicate"] += duplicates
        errors = {}  # shard name -> the first errors met in it
        for k, shard in enumerate(self.shards):
            found = filt[k].get("errors", []) + fin[k].get("errors", [])
            if found:
                errors[shard.paths[0]] = found
        read, kept = sum(s["read"] for s in filt), sum(s["out"] for s in fin)
        accounted = kept + sum(rejected.values()) + sum(skipped.values()) + sum(unreadable.values())
        if read != accounted:  # a bug in the bookkeeping, never the input's fault
            raise AssertionError(f"report does not balance: read {read}, accounted for {accounted}")
        report = {
            "shards": len(self.shards),
            "read": read,
            "kept": kept,
            "rejected": dict(sorted(rejected.items())),
            "skipped": dict(sorted(skipped.items())),
            "unreadable": dict(sorted(unreadable.items())),
            "errors": errors,
            "stages": [
                {"stage": "read (records)", "docs": read},
                {"stage": "documents", "docs": sum(s["documents"] for s in filt),
                 "words": sum(s["read_words"] for s in filt)},
                {"stage": "extract+language+rules", "docs": sum(s["kept"] for s in filt),
                 "words": sum(s["kept_words"] for s in filt)},
                {"stage": "dedup", "docs": sum(s["in"] - s["duplicates"] for s in fin)},
                {"stage": "safety (final)", "docs": kept, "words": sum(s["out_words"] for s in fin)},
            ],
            "duplicates": json.loads((self.out / "clusters" / "summary.json").read_text()),
        }
        if self.cfg.tokenizer:
            report["tokens"] = sum(s.get("tokens", 0) for s in fin)
            self._token_meta()
        _atomic_write(self.out / "report.json", json.dumps(report, indent=2).encode())
        return report

    def _token_meta(self) -> None:
        """meta.json for the token shards, so that `TokenDataset(out_dir / "tokens")` reads them."""
        from ...data import read_header
        from ...hf import load_any_tokenizer
        tokens_dir = self.out / "tokens"
        shards = sorted(p.name for p in tokens_dir.glob("train*.bin"))
        tok = load_any_tokenizer(self.cfg.tokenizer)
        tok.save(tokens_dir / "tokenizer.json")
        total = sum(read_header(tokens_dir / s).num_tokens for s in shards)
        meta = {"vocab_size": tok.vocab_size, "splits": {"train": {"shards": shards, "tokens": total}}}
        _atomic_write(tokens_dir / "meta.json", json.dumps(meta, indent=2).encode())


def _counts(counts: dict) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in counts.items()) or "none"


def format_report(report: dict) -> str:
    lines = [f"{'stage':<26}{'documents':>12}{'words':>14}"]
    for s in report["stages"]:
        words = f"{s['words']:,}" if "words" in s else "-"
        lines.append(f"{s['stage']:<26}{s['docs']:>12,}{words:>14}")
    lines.append(f"records: {report['read']:,} read = {report['kept']:,} kept + "
                 f"{sum(report['rejected'].values()):,} rejected + {sum(report['skipped'].values()):,} "
                 f"skipped + {sum(report['unreadable'].values()):,} unreadable")
    for kind in ("rejected", "skipped", "unreadable"):
        lines.append(f"{kind}: {_counts(report[kind])}")
    for shard, errors in report["errors"].items():
        lines.append(f"errors in {shard}: {errors[0]['detail']}"
                     + (f" (and {len(errors) - 1} more in report.json)" if len(errors) > 1 else ""))
    d = report["duplicates"]
    lines.append(f"duplicates: {d['removed']} removed in {d['clusters']} clusters "
                 f"(largest {d['largest_cluster']})")
    return "\n".join(lines)


# --- local workers: one pool for the run ----------------------------------------------------------------

_worker_pipeline: Pipeline | None = None  # each pool worker's own Pipeline, built once


def _init_worker(cfg: PipelineConfig) -> None:
    global _worker_pipeline
    _worker_pipeline = Pipeline(cfg)


def _run_item(task: tuple[str, int]) -> None:
    _worker_pipeline.run_item(*task)


def run(cfg: PipelineConfig, before_stage: Callable[[str], None] | None = None) -> dict:
    """Run the requested stage(s). Launched as ranks (flags or environment), this process does its
    share and waits for the others through files; otherwise `workers` local processes (one pool,
    started once) share each stage item by item. Returns the report once every shard is finished."""
    pipeline = Pipeline(cfg)
    stages = STAGES if cfg.stage == "all" else (cfg.stage,)
    launched = cfg.rank is not None or any(v in os.environ for v in ("RANK", "SLURM_PROCID",
                                                                    "SLURM_ARRAY_TASK_ID"))
    with contextlib.ExitStack() as stack:
        pool = None
        if not launched and cfg.workers > 1:
            pool = stack.enter_context(get_context("spawn").Pool(cfg.workers, _init_worker, (cfg,)))
        for stage in stages:
            if before_stage:
                before_stage(stage)
            if launched:
                rank, world = rank_and_world(cfg)
                pipeline.run_stage(stage, rank, world, progress=rank == 0)
            elif pool is not None and stage != "clusters":
                pipeline.wait_for(stage)
                todo = pipeline.todo(stage)
                done = pool.imap_unordered(_run_item, [(stage, k) for k in todo])
                for _ in tqdm(done, total=len(todo), desc=stage, disable=len(todo) < 2):
                    pass
            else:
                pipeline.run_stage(stage, 0, 1, progress=True)
    if all(pipeline.done("final", k).exists() for k in range(len(pipeline.shards))):
        return pipeline.report()
    return {}
