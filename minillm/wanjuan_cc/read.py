"""Reading documents (WanJuan-CC stage 1): WARC, JSONL and folders of text files.

Every reader yields records: dicts with `id` and either `html` (bytes, plus `content_type`) or
`text`, and `url` / `date` where the source has them. JSONL records keep all their other fields.
The unit of parallel work is a *shard*: one WARC or JSONL file, or a group of text files.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..corpus import read_jsonl

TEXT_FILES_PER_SHARD = 500
WARC_SUFFIXES = (".warc", ".warc.gz", ".arc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson")


@dataclass(frozen=True)
class Shard:
    """One unit of work: its kind ('warc', 'jsonl' or 'text') and its files."""
    kind: str
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return Path(self.paths[0]).name


def list_shards(inputs: list[str]) -> list[Shard]:
    """Shards of the input files and folders, in a fixed (sorted) order."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"input not found: {p}")
    shards, texts = [], []
    for f in files:
        name = f.name.lower()
        if name.endswith(WARC_SUFFIXES):
            shards.append(Shard("warc", (str(f),)))
        elif name.endswith(JSONL_SUFFIXES):
            shards.append(Shard("jsonl", (str(f),)))
        else:
            texts.append(str(f))
    for i in range(0, len(texts), TEXT_FILES_PER_SHARD):
        shards.append(Shard("text", tuple(texts[i:i + TEXT_FILES_PER_SHARD])))
    if not shards:
        raise FileNotFoundError(f"no input files in {inputs}")
    return shards


def read_warc(path: str) -> Iterator[dict]:
    """HTML `response` records and WET `conversion` (plain text) records of a WARC file."""
    try:
        from warcio.archiveiterator import ArchiveIterator
    except ImportError:
        raise ImportError("reading WARC needs warcio: pip install -e '.[data]'") from None
    with open(path, "rb") as f:
        for record in ArchiveIterator(f):
            headers = record.rec_headers
            base = {"id": headers.get_header("WARC-Record-ID") or "",
                    "url": headers.get_header("WARC-Target-URI") or "",
                    "date": headers.get_header("WARC-Date") or ""}
            if record.rec_type == "response" and record.http_headers is not None:
                content_type = record.http_headers.get_header("Content-Type") or ""
                if "html" not in content_type.lower():
                    continue
                yield {**base, "html": record.content_stream().read(), "content_type": content_type}
            elif record.rec_type == "conversion":
                yield {**base, "text": record.content_stream().read().decode("utf-8", "replace")}


def read_shard(shard: Shard, text_field: str = "text") -> Iterator[dict]:
    if shard.kind == "warc":
        yield from read_warc(shard.paths[0])
    elif shard.kind == "jsonl":
        for i, record in enumerate(read_jsonl(shard.paths[0], text_field)):
            record = dict(record)
            record["text"] = record.pop(text_field)
            record.setdefault("id", f"{shard.name}:{i}")
            yield record
    else:
        for path in shard.paths:
            raw = Path(path).read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("cp1252", errors="replace")
            yield {"id": path, "text": text}
