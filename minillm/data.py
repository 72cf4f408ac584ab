"""Token shards on disk, the loader that reads them, and mixtures of domains.

Shard file (`*.bin`): a 64-byte little-endian header, then the tokens as uint16 (vocab <= 65,536)
or uint32. Header: magic `MLLMTOKS`, format version, bytes per token, token count, vocab size,
id of the document separator (`<|endoftext|>`, -1 if none). Documents are written one after another,
each followed by the separator. A shard is written to `NAME.tmp` and renamed when complete, so a
crash never leaves a half-written shard under a real name. `ShardWriter` is the only writer of
shards in minillm; everything that produces tokens (`prepare`, the data pipeline) goes through it.

A dataset folder made by `prepare` holds `train_000000.bin, ...`, `val_000000.bin, ...`,
`tokenizer.json` and `meta.json` (written last: its presence means the folder is complete).

Loading: `TokenDataset` memory-maps the shards of one split. `TokenLoader` cuts them into windows of
`block_size + 1` tokens (inputs are the first `block_size`, targets the last `block_size`) that start
every `block_size` tokens and never cross a shard boundary. Each epoch visits every window once, in a
seeded random order (or in order), and rank r of W takes every W-th window of that order, so ranks
never overlap. Its state is two integers (epoch, cursor): a restored loader continues the same stream.
`MixtureLoader` draws each row of a batch from one of several named domains with weights that may
change during training (Sheared-LLaMA's dynamic batch loading).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .errors import UserError
from .fileio import atomic_write, write_json
from .model import IGNORE_INDEX
from .tokenizer import Tokenizer, load_tokenizer

MAGIC = b"MLLMTOKS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQq")  # magic, version, itemsize, num_tokens, vocab_size, eot_id


class DataError(UserError):
    """Bad or unusable data; the message names the file and what was expected."""


# --- shards -----------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass(frozen=True)
class ShardHeader:
    itemsize: int
    num_tokens: int
    vocab_size: int
    eot_id: int


def read_header(path: str | Path) -> ShardHeader:
    """Read and validate a shard's header, including that the file holds exactly its tokens."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"shard not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, shorter than the "
                        f"{HEADER_BYTES}-byte header)")
    magic, version, itemsize, num_tokens, vocab_size, eot_id = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise DataError(f"{path}: not a minillm token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise DataError(f"{path}: shard format version {version}, this minillm reads {VERSION}")
    if itemsize not in (2, 4):
        raise DataError(f"{path}: bytes per token {itemsize}, expected 2 or 4")
    expected = HEADER_BYTES + num_tokens * itemsize
    if size != expected:
        raise DataError(f"{path}: truncated or corrupt shard: header says {num_tokens} tokens "
                        f"({expected} bytes), file has {size} bytes")
    return ShardHeader(itemsize, num_tokens, vocab_size, eot_id)


def open_shard(path: str | Path) -> tuple[ShardHeader, np.ndarray]:
    """The header and a read-only memory map of a shard's tokens."""
    header = read_header(path)
    dtype = np.uint16 if header.itemsize == 2 else np.uint32
    if header.num_tokens == 0:
        return header, np.zeros(0, dtype=dtype)
    return header, np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES,
                             shape=(header.num_tokens,))


def _write_shard(path: Path, tokens: np.ndarray, vocab_size: int, eot_id: int) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, tokens.itemsize, len(tokens), vocab_size, eot_id)
                    .ljust(HEADER_BYTES, b"\0"))
            f.write(tokens.tobytes())
    atomic_write(path, write)


class ShardWriter:
    """Append documents (token id sequences) to numbered shards `{prefix}_{index:06d}.bin` in
    `directory`, each holding at most `shard_tokens` tokens. A document longer than the room left
    continues in the next shard. Call `close()` (or use `with`) to write the last shard.
    """

    def __init__(self, directory: str | Path, prefix: str, vocab_size: int, eot_id: int | None,
                 shard_tokens: int = 100_000_000):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.eot_id = -1 if eot_id is None else eot_id
        self.dtype = token_dtype(vocab_size)
        self.buffer = np.empty(shard_tokens, dtype=self.dtype)
        self.filled = 0
        self.paths: list[Path] = []
        self.num_tokens = 0
        self.num_documents = 0

    def add(self, ids: Iterable[int] | np.ndarray, separator: bool = True) -> None:
        """Append one document, followed by the separator token unless `separator=False`."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = int(ids.max() if ids.max() >= self.vocab_size else ids.min())
            raise DataError(f"token id {bad} outside the vocabulary of size {self.vocab_size} "
                            f"(writing {self.directory / self.prefix}_*.bin)")
        if separator and self.eot_id >= 0:
            ids = np.append(ids, self.eot_id)
        self.num_documents += 1
        while ids.size:
            n = min(ids.size, len(self.buffer) - self.filled)
            self.buffer[self.filled:self.filled + n] = ids[:n]
            self.filled += n
            ids = ids[n:]
            if self.filled == len(self.buffer):
                self._flush()

    def _flush(self) -> None:
        if self.filled == 0:
            return
        path = self.directory / f"{self.prefix}_{len(self.paths):06d}.bin"
        _write_shard(path, self.buffer[:self.filled], self.vocab_size, self.eot_id)
        self.paths.append(path)
        self.num_tokens += self.filled
        self.filled = 0

    def close(self) -> list[Path]:
        """Write the last, partly filled shard; returns the paths of all shards written."""
        self._flush()
        return self.paths

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()


# --- preparing a dataset folder -----------------------------------------------------------------

def is_validation(index: int, val_fraction: float) -> bool:
    """Whether document `index` goes to the validation split: exactly a `val_fraction` of documents,
    spread evenly and starting with document 0 (so a tiny corpus still has validation text)."""
    return math.ceil((index + 1) * val_fraction) > math.ceil(index * val_fraction)


def prepare(documents: Iterable[str], tokenizer: Tokenizer, out_dir: str | Path,
            val_fraction: float = 0.01, shard_tokens: int = 100_000_000, workers: int = 4,
            chunk_documents: int = 512, progress: bool = True) -> dict:
    """Tokenize `documents` into train / val shards in `out_dir`, with the tokenizer beside them.

    Encoding runs in `workers` threads (tiktoken releases the GIL). Returns the metadata that is
    also written to `out_dir/meta.json`, last and atomically.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):  # an earlier run's shards would mix with ours
        for stale in list(out_dir.glob(f"{split}_*.bin")) + list(out_dir.glob(f"{split}_*.bin.tmp")):
            stale.unlink()
    (out_dir / "meta.json").unlink(missing_ok=True)
    tokenizer.save(out_dir / "tokenizer.json")
    try:
        eot = tokenizer.eot_id
    except KeyError:
        eot = None
        print(f"note: {tokenizer!r} has no end-of-text token; documents are concatenated without "
              "a separator")
    writers = {split: ShardWriter(out_dir, split, tokenizer.vocab_size, eot, shard_tokens)
               for split in ("train", "val")}
    bar = tqdm(desc=f"tokenizing into {out_dir}", unit="doc", disable=not progress)
    index = 0
    for chunk in _chunks(documents, chunk_documents):
        for ids in tokenizer.encode_ordinary_batch(chunk, num_threads=workers):
            split = "val" if val_fraction > 0 and is_validation(index, val_fraction) else "train"
            writers[split].add(ids)
            index += 1
        bar.update(len(chunk))
    bar.close()
    meta = {"vocab_size": tokenizer.vocab_size, "eot_id": eot, "num_documents": index, "splits": {}}
    for split, writer in writers.items():
        paths = writer.close()
        meta["splits"][split] = {"shards": [p.name for p in paths], "tokens": writer.num_tokens,
                                 "documents": writer.num_documents}
    if meta["splits"]["train"]["tokens"] == 0:
        raise DataError(f"{out_dir}: no training tokens: the input held {index} document(s)"
                        + (f" and all went to validation (val_fraction={val_fraction})" if index else ""))
    write_json(out_dir / "meta.json", meta, indent=2)
    return meta


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# --- loading ------------------------------------------------------------------------------------

class TokenDataset:
    """The memory-mapped shards of one split.

    `source` is a dataset folder made by `prepare` (with `split` choosing train or val), a single
    shard, or a list of shards. `vocab_size`, when given, must cover the shards' vocabulary;
    `verify` also scans every token once for ids beyond it (about 0.1 s per GB).
    """

    def __init__(self, source: str | Path | list, split: str = "train", vocab_size: int | None = None,
                 verify: bool = True):
        self.paths = self._resolve(source, split)
        self.shards = []
        self.vocab_size = 0
        for path in self.paths:
            header, tokens = open_shard(path)
            if vocab_size is not None and header.vocab_size > vocab_size:
                raise DataError(f"{path}: shard was written for a vocabulary of {header.vocab_size} "
                                f"ids, the model has {vocab_size}")
            if verify and len(tokens) and int(tokens.max()) >= header.vocab_size:
                raise DataError(f"{path}: token id {int(tokens.max())} beyond the shard's vocabulary "
                                f"of {header.vocab_size} ids (corrupt shard)")
            self.shards.append(tokens)
            self.vocab_size = max(self.vocab_size, header.vocab_size)
        self.num_tokens = sum(len(s) for s in self.shards)
        if self.num_tokens == 0:
            raise DataError(f"empty dataset: {len(self.paths)} shard(s) with no tokens "
                            f"({self.paths[0].parent})")

    @staticmethod
    def _resolve(source, split) -> list[Path]:
        if isinstance(source, (list, tuple)):
            paths = [Path(p) for p in source]
        else:
            source = Path(source)
            if source.is_dir():
                meta = source / "meta.json"
                if not meta.is_file():
                    raise DataError(f"{source}: no meta.json: not a dataset folder made by "
                                    "minillm.data.prepare (or its preparation did not finish)")
                splits = json.loads(meta.read_text())["splits"]
                if split not in splits:
                    raise DataError(f"{meta}: no split {split!r} (has {sorted(splits)})")
                paths = [source / name for name in splits[split]["shards"]]
            else:
                paths = [source]
        if not paths:
            raise DataError(f"empty dataset: no shards for split {split!r} in {source}")
        return paths

    def __len__(self) -> int:
        return self.num_tokens


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def window_offsets(dataset: TokenDataset, block_size: int) -> np.ndarray:
    """(num_shards + 1,) cumulative window counts: window k of shard s covers tokens
    [k*T, k*T + T + 1) of that shard, so global window i lies in shard s where
    offsets[s] <= i < offsets[s + 1]."""
    counts = np.array([max(len(s) - 1, 0) // block_size for s in dataset.shards], dtype=np.int64)
    return np.concatenate([[0], np.cumsum(counts)])


def window(dataset: TokenDataset, block_size: int, offsets: np.ndarray, window_id: int) -> np.ndarray:
    """The `block_size + 1` tokens of global window `window_id`."""
    shard = int(np.searchsorted(offsets, window_id, side="right")) - 1
    start = (window_id - int(offsets[shard])) * block_size
    return dataset.shards[shard][start:start + block_size + 1]


class TokenLoader:
    """Windows of `block_size + 1` tokens from a `TokenDataset`, epoch by epoch, split over ranks.

    `shuffle=True` visits the windows of each epoch in the order of a permutation seeded by
    (seed, epoch); otherwise in file order. Every rank gets the same number of windows per epoch
    (the remainder of an epoch is dropped) so that ranks stay in step. `rank` / `world_size` default
    to torch.distributed's (or the RANK / WORLD_SIZE environment variables).
    """

    def __init__(self, dataset: TokenDataset, block_size: int, batch_size: int = 1, seed: int = 0,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 device: str | torch.device = "cpu"):
        if rank is None or world_size is None:
            rank, world_size = _dist_rank_world()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.dataset, self.block_size, self.batch_size = dataset, block_size, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.device = torch.device(device)
        self.window_offsets = window_offsets(dataset, block_size)
        num_windows = int(self.window_offsets[-1])
        self.windows_per_rank = num_windows // world_size
        if self.windows_per_rank == 0:
            longest = max(len(s) for s in dataset.shards)
            raise DataError(f"block size {block_size} is too long for the data: the longest shard "
                            f"holds {longest} tokens ({dataset.paths[0].parent}), giving "
                            f"{num_windows} window(s) of {block_size + 1} tokens for "
                            f"{world_size} rank(s)")
        self.epoch = 0
        self.cursor = 0  # windows of this epoch this rank has consumed
        self._order_epoch, self._order = None, None

    def _my_windows(self, epoch: int) -> np.ndarray:
        """Global window ids this rank visits in `epoch`, in order."""
        if self._order_epoch != epoch:
            n = self.windows_per_rank * self.world_size
            total = int(self.window_offsets[-1])
            order = (np.random.default_rng([self.seed, epoch]).permutation(total) if self.shuffle
                     else np.arange(total))
            self._order = order[:n].reshape(self.windows_per_rank, self.world_size)[:, self.rank]
            self._order_epoch = epoch
        return self._order

    def _window(self, window_id: int) -> np.ndarray:
        return window(self.dataset, self.block_size, self.window_offsets, window_id)

    def next_windows(self, n: int) -> np.ndarray:
        """The next `n` windows of this rank's stream, shape (n, block_size + 1), int64."""
        out = np.empty((n, self.block_size + 1), dtype=np.int64)
        for i in range(n):
            if self.cursor == self.windows_per_rank:
                self.epoch, self.cursor = self.epoch + 1, 0
            out[i] = self._window(int(self._my_windows(self.epoch)[self.cursor]))
            self.cursor += 1
        return out

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (batch_size, block_size) int64 on `device`."""
        return to_batch(self.next_windows(self.batch_size), self.device)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed,
                "shuffle": self.shuffle, "block_size": self.block_size,
                "world_size": self.world_size, "num_windows": int(self.window_offsets[-1])}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved by `state_dict`; the data and layout must be the same."""
        for key in ("seed", "shuffle", "block_size", "world_size", "num_windows"):
            mine = self.state_dict()[key]
            if state.get(key) != mine:
                raise UserError(f"loader state has {key}={state.get(key)!r} but this loader has "
                                f"{mine!r}: the data changed, so the stream cannot be continued "
                                "exactly (start a new run, or restore the data)")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])


def to_batch(windows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Split (B, T+1) windows into inputs and targets (B, T) on `device`."""
    t = torch.from_numpy(windows)
    x, y = t[:, :-1], t[:, 1:]
    if device.type == "cuda":
        return (x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True))
    return x.contiguous().to(device), y.contiguous().to(device)


def eval_batches(dataset: TokenDataset, block_size: int, batch_size: int,
                 max_windows: int | None = None, rank: int | None = None,
                 world_size: int | None = None, device: str | torch.device = "cpu"
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """The same evaluation windows every time, whatever the number of processes: the first
    `max_windows` windows of the split in file order (default: all of them), dealt out in turn
    (window i to rank i % world_size) and batched by `batch_size`. Yields (x, y, rows): the last
    batch of a rank may be short. Every rank yields the same number of batches, since a sharded
    (FSDP) forward pass is a collective: a rank whose share has run out gets a one-row batch whose
    targets are all IGNORE_INDEX and `rows` 0. Summing `loss * rows` over the batches of all ranks
    and dividing by the number of windows gives the same mean as one process."""
    if rank is None or world_size is None:
        rank, world_size = _dist_rank_world()
    offsets = window_offsets(dataset, block_size)
    total = int(offsets[-1]) if max_windows is None else min(int(offsets[-1]), max_windows)
    if total == 0:
        raise DataError(f"{dataset.paths[0].parent}: no evaluation window of {block_size + 1} "
                        f"tokens (the split holds {dataset.num_tokens} tokens)")
    mine = np.arange(rank, total, world_size)
    windows_per_rank = math.ceil(total / world_size)  # rank 0's share, the largest
    batches_per_rank = math.ceil(windows_per_rank / batch_size)
    for b in range(batches_per_rank):
        ids = mine[b * batch_size:(b + 1) * batch_size]
        rows = len(ids)
        windows = np.stack([window(dataset, block_size, offsets, int(i)) for i in (ids if rows else [0])])
        x, y = to_batch(windows.astype(np.int64), torch.device(device))
        if rows == 0:
            y = torch.full_like(y, IGNORE_INDEX)
        yield x, y, rows


# --- mixtures -----------------------------------------------------------------------------------

def parse_domains(specs: list[str]) -> dict[str, tuple[str, float]]:
    """Domains from command-line specs: `PATH` (named after its folder, weight 1) or
    `NAME=PATH[:WEIGHT]`, e.g. `["web=data/web:0.7", "code=data/code:0.3"]`.

    A spec that is an existing path is a path, whatever characters it holds; otherwise the text
    before the first '=' is a name when it holds no path separator (so `data/a=b` is a path).
    A trailing `:NUMBER` is the weight (a ':' followed by anything else belongs to the path)."""
    domains: dict[str, tuple[str, float]] = {}
    for spec in specs:
        name, path = "", spec
        head, sep, tail = spec.partition("=")
        if sep and "/" not in head and "\\" not in head and not Path(spec).exists():
            name, path = head, tail
        weight = 1.0
        body, sep, number = path.rpartition(":")
        if sep and not Path(path).exists():
            try:
                weight = float(number)
            except ValueError:
                pass  # a ':' that belongs to the path
            else:
                path = body
                if not (math.isfinite(weight) and weight >= 0):
                    raise UserError(f"data spec {spec!r}: the weight after ':' must be a finite "
                                    f"number >= 0, got {number!r}")
        name = name or Path(path).name
        if not path or not name:
            raise UserError(f"data spec {spec!r}: expected PATH or NAME=PATH[:WEIGHT]")
        if name in domains:
            raise UserError(f"domain {name!r} is given twice in {specs}")
        domains[name] = (path, weight)
    if not domains:
        raise UserError("no data given: pass at least one dataset folder")
    return domains


class MixtureLoader:
    """Batches whose rows come from named domains in proportion to `weights`.

    Every row independently picks a domain (seeded by seed, step and rank), then takes the next window
    of that domain's loader. `set_weights` changes the proportions from the next batch on, as
    Sheared-LLaMA's dynamic batch loading does. `next_batch` also returns each row's domain index
    (into `self.names`) so that losses can be reported per domain.
    """

    def __init__(self, loaders: dict[str, TokenLoader], weights: dict[str, float], batch_size: int,
                 seed: int = 0):
        if not loaders:
            raise ValueError("a mixture needs at least one domain")
        block_sizes = {loader.block_size for loader in loaders.values()}
        if len(block_sizes) != 1:
            raise ValueError(f"all domains must use one block size, got {sorted(block_sizes)}")
        self.names = list(loaders)
        self.loaders = loaders
        self.batch_size, self.seed, self.step = batch_size, seed, 0
        self.rank = next(iter(loaders.values())).rank
        self.device = next(iter(loaders.values())).device
        self.set_weights(weights)

    def set_weights(self, weights: dict[str, float]) -> None:
        """New domain proportions (normalised here); every domain must be named."""
        if set(weights) != set(self.names):
            raise ValueError(f"weights name {sorted(weights)}, the domains are {sorted(self.names)}")
        w = np.array([float(weights[n]) for n in self.names])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero: {weights}")
        self.weights = w / w.sum()

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Inputs and targets (B, T) on the device and the domain index of each row (B,), on the
        CPU."""
        rng = np.random.default_rng([self.seed, self.step, self.rank])
        domain_B = rng.choice(len(self.names), size=self.batch_size, p=self.weights)
        windows = np.empty((self.batch_size, next(iter(self.loaders.values())).block_size + 1),
                           dtype=np.int64)
        for d, name in enumerate(self.names):
            rows = np.flatnonzero(domain_B == d)
            if rows.size:
                windows[rows] = self.loaders[name].next_windows(rows.size)
        self.step += 1
        x, y = to_batch(windows, self.device)
        return x, y, torch.from_numpy(domain_B)  # on the CPU: a copy to the GPU would wait for it

    def state_dict(self) -> dict:
        return {"step": self.step, "weights": dict(zip(self.names, self.weights.tolist())),
                "domains": {n: loader.state_dict() for n, loader in self.loaders.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.set_weights(state["weights"])
        for name, loader in self.loaders.items():
            loader.load_state_dict(state["domains"][name])


# --- a run's data, checked before anything is written -------------------------------------------

def check_dataset_folder(path: Path) -> None:
    """A dataset folder made by prepare_data.py, or a one-line error that says what to do."""
    if not path.exists():
        raise DataError(f"data folder {path} does not exist: make it with scripts/prepare_data.py "
                        "(or pass --data PATH)")
    if not path.is_dir():
        raise DataError(f"--data {path} is a file, not a folder: pass a dataset folder made by "
                        "scripts/prepare_data.py (it holds meta.json, tokenizer.json and the "
                        "train_*.bin / val_*.bin shards)")
    if not (path / "meta.json").is_file():
        raw = [p.name for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".json", ".md")]
        hint = (f"it holds raw text ({', '.join(sorted(raw)[:3])}): run scripts/prepare_data.py on "
                "it first" if raw else "run scripts/prepare_data.py first")
        raise DataError(f"{path} is not a prepared dataset (no meta.json): {hint}")
    if not (path / "tokenizer.json").is_file():
        raise DataError(f"{path}: no tokenizer.json beside the shards (was prepare_data.py "
                        "interrupted?)")


def build_mixture(specs: list[str], block_size: int, batch_size: int, seed: int, rank: int,
                  world_size: int, device, with_validation: bool):
    """(MixtureLoader, tokenizer, {domain: validation TokenDataset}) for the domains of `specs`
    (`parse_domains`), checked up front: dataset folders made by prepare_data.py, one tokenizer
    for all domains, shards within its vocabulary, at least one batch of training windows per
    process and (`with_validation`) one validation window."""
    tokenizer, loaders, weights, val = None, {}, {}, {}
    for name, (path, weight) in parse_domains(specs).items():
        check_dataset_folder(Path(path))
        tok = load_tokenizer(Path(path) / "tokenizer.json")
        if tokenizer is None:
            tokenizer, first = tok, path
        elif tok.to_dict() != tokenizer.to_dict():
            raise UserError(f"{path} was tokenized with another tokenizer than {first}: "
                            "all domains must share one")
        loaders[name] = TokenLoader(TokenDataset(path, "train", vocab_size=tok.vocab_size),
                                    block_size, batch_size, seed=seed, rank=rank,
                                    world_size=world_size, device=device)
        if loaders[name].windows_per_rank < batch_size:
            raise DataError(f"{path}: the train split gives {loaders[name].windows_per_rank} "
                            f"window(s) of {block_size + 1} tokens per process, fewer than "
                            f"--batch-size {batch_size}")
        if with_validation:
            try:
                val[name] = TokenDataset(path, "val", vocab_size=tok.vocab_size)
                next(eval_batches(val[name], block_size, 1, max_windows=1, rank=0, world_size=1))
            except DataError as e:
                raise DataError(f"{e}; evaluating (--eval-interval) needs a validation split: "
                                "prepare the data with --val-fraction > 0, or pass "
                                "--eval-interval 0") from None
        weights[name] = weight
    return MixtureLoader(loaders, weights, batch_size, seed=seed), tokenizer, val


def check_data_source(source, tokenizer, block_size: int, rank: int, world_size: int,
                      eval_interval: int) -> None:
    """A caller's batch source for the trainer (e.g. minillm.sft.PackedLoader): it must come with
    its tokenizer, agree with the run's block size and process layout, and, when the run
    evaluates, yield a validation batch now rather than fail at the first evaluation."""
    if tokenizer is None:
        raise UserError("Trainer(data_source=...) needs the tokenizer of its tokens")
    if eval_interval and not hasattr(source, "eval_batches"):
        raise UserError(f"--eval-interval {eval_interval}: the data source has no eval_batches; "
                        "pass --eval-interval 0")
    for name, mine in (("block_size", block_size), ("rank", rank), ("world_size", world_size)):
        theirs = getattr(source, name, mine)
        if theirs != mine:
            raise UserError(f"the data source has {name} {theirs}, the run {mine}: build it "
                            f"with the run's {name}")
    if eval_interval:
        next(iter(source.eval_batches(1, 0, 1)))
