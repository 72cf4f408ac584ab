"""Reading documents (WanJuan-CC stage 1): WARC / ARC, JSONL and folders of text files.

Every reader yields, for each record of its input, either a *document* (a dict with `id` and either
`html` (bytes, plus `content_type`) or `text`, and `url` / `date` where the source has them; JSONL
records keep all their other fields) or a `Dropped` that says why the record is not one: `skipped`
(a request, a PDF, a redirect), `unreadable` (junk, a truncated or corrupt record) or `rejected`
(over the size limit). Nothing raises for bad input, and nothing is lost without a count: the
pipeline's report adds these up so that records read = kept + rejected + skipped + unreadable.

The WARC reader is our own rather than warcio's iterator, because isolation needs control of the
byte stream: gzip members are decompressed one at a time, so a corrupt member costs its own record
and reading resumes at the next member; in an uncompressed file, junk is skipped up to the next
`WARC/1.x` line. A record shorter than its Content-Length at the end of the input is `truncated`.
Compression is recognised by its magic bytes, not by the file name. The unit of parallel work is a
*shard*: one WARC or JSONL file, or a group of text files.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError

TEXT_FILES_PER_SHARD = 500
WARC_SUFFIXES = (".warc", ".warc.gz", ".arc", ".arc.gz")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")
MAX_DOCUMENT_BYTES = 1 << 23  # 8 MiB of HTML or text: larger documents are rejected as limit:size
GZIP_MAGIC = b"\x1f\x8b\x08"
CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 16  # a WARC or HTTP header block longer than this is junk


@dataclass(frozen=True)
class Shard:
    """One unit of work: its kind ('warc', 'jsonl' or 'text') and its files."""
    kind: str
    paths: tuple[str, ...]

    @property
    def name(self) -> str:
        return Path(self.paths[0]).name


@dataclass(frozen=True)
class Dropped:
    """A record that is not a document. `kind`: 'skipped', 'unreadable' or 'rejected'; `reason`: a
    short key for the report ('warc_type:request', 'warc:truncated'); `detail`: where and what, for
    the report's list of file errors and for `--strict`."""
    kind: str
    reason: str
    detail: str = ""


def list_shards(inputs: list[str]) -> list[Shard]:
    """Shards of the input files and folders, in a fixed (sorted) order."""
    files: list[Path] = []
    for p in map(Path, inputs):
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"input not found: {p}")
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
        raise UserError(f"no input files in {' '.join(map(str, inputs))}")
    return shards


# --- bytes: plain, or gzip members one at a time ------------------------------------------------------

@dataclass(frozen=True)
class _Gap:
    """In a decompressed stream: bytes were lost here (corrupt or truncated gzip, or garbage)."""
    reason: str
    detail: str


def _stream(f, path: str) -> Iterator[bytes | _Gap]:
    """The file's bytes, decompressed if it starts with the gzip magic, with a `_Gap` wherever
    bytes were lost. Decompression output per call is bounded, so a gzip bomb streams."""
    buf = f.read(CHUNK)
    if not buf.startswith(GZIP_MAGIC):
        while buf:
            yield buf
            buf = f.read(CHUNK)
        return
    i, offset, at_eof = 0, 0, False  # buf[i] is at file offset `offset + i`
    d, member = None, 0  # the current member's decompressor and its start offset
    in_garbage = False
    while True:
        if len(buf) - i < 1 << 16 and not at_eof:  # keep at least 64 KiB of input ahead
            more = f.read(CHUNK)
            at_eof = not more
            offset, buf, i = offset + i, buf[i:] + more, 0
        if d is None:  # between members: the next one starts at the next magic
            k = buf.find(GZIP_MAGIC, i)
            if k != i:
                junk = buf[i:k if k >= 0 else max(len(buf) - 2, i)]
                if not in_garbage and junk.strip(b"\0 \t\r\n"):  # zero padding is harmless
                    yield _Gap("gzip:garbage", f"{path}: offset {offset + i}: bytes that are not gzip")
                    in_garbage = True
                if k < 0:
                    if at_eof:
                        return
                    i = max(len(buf) - 2, i)
                    continue
                i = k
            d, member, in_garbage = zlib.decompressobj(31), offset + i, False
        piece = memoryview(buf)[i:i + (1 << 16)]
        try:
            out = d.decompress(piece, CHUNK)
        except zlib.error as e:
            yield _Gap("gzip:corrupt", f"{path}: gzip member at offset {member}: {e}")
            d, in_garbage = None, True  # resume at the next magic after this member's start
            i = max(i, member - offset + 1)
            continue
        # at the member's end the rest of the piece is in unused_data (and, after an earlier call
        # that hit the output limit, in unconsumed_tail as well); before it, in unconsumed_tail
        i += len(piece) - len(d.unused_data if d.eof else d.unconsumed_tail)
        if out:
            yield out
        if d.eof:
            d = None
        elif i >= len(buf) and at_eof and not d.unconsumed_tail:
            tail = d.flush()
            if tail:
                yield tail
            yield _Gap("gzip:truncated", f"{path}: gzip member at offset {member} is cut short")
            return


# --- WARC and ARC records -----------------------------------------------------------------------------

_REASON_SAFE = re.compile(r"[^a-z0-9.+/_-]")


def _reason_key(prefix: str, value: str) -> str:
    """A report key from an untrusted value: lower case, safe characters, short."""
    value = _REASON_SAFE.sub("", value.strip().lower())[:40]
    return f"{prefix}:{value or 'missing'}"


def _parse_headers(block: bytes) -> tuple[str, dict[str, str]]:
    """(first line, {lower-cased name: value}) of a header block; the first value of a name wins."""
    lines = block.decode("latin-1").splitlines()
    fields: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    return (lines[0] if lines else ""), fields


def _header_end(data, start: int = 0, stop: int | None = None) -> tuple[int, int]:
    """(end of the header block, start of what follows), or (-1, -1): CRLF CRLF, or LF LF."""
    stop = len(data) if stop is None else stop
    a, b = data.find(b"\r\n\r\n", start, stop), data.find(b"\n\n", start, stop)
    if a >= 0 and (b < 0 or a <= b):
        return a, a + 4
    return (b, b + 2) if b >= 0 else (-1, -1)


def _dechunk(body: bytes) -> bytes | None:
    """HTTP chunked transfer coding removed, or None if `body` is not validly chunked."""
    out, i = [], 0
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            return None
        try:
            size = int(body[i:j].split(b";")[0].strip(), 16)
        except ValueError:
            return None
        if size == 0:
            return b"".join(out)
        out.append(body[j + 2:j + 2 + size])
        if len(out[-1]) < size:
            return None
        i = j + 2 + size + 2


def _decode_content(body: bytes, encoding: str, limit: int) -> bytes | Dropped:
    """Undo a Content-Encoding (gzip, deflate; br where the brotli module is installed)."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity", "none"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        for wbits in ((31,) if "gzip" in encoding else (15, -15)):
            try:
                d = zlib.decompressobj(wbits)
                out = d.decompress(body, limit + 1)
                if len(out) > limit:
                    return Dropped("rejected", "limit:size", f"{encoding} body over {limit} bytes")
                return out
            except zlib.error as e:
                error = e
        return Dropped("unreadable", "http:bad_content_encoding", f"{encoding}: {error}")
    if encoding == "br":
        try:
            import brotli  # optional: only pages stored still compressed need it
        except ImportError:
            return Dropped("skipped", "content_encoding:br", "install brotli to read br-encoded pages")
        try:
            out = brotli.decompress(body)
        except Exception as e:  # noqa: BLE001 - any failure of the decoder is an unreadable body
            return Dropped("unreadable", "http:bad_content_encoding", f"br: {e}")
        return out if len(out) <= limit else Dropped("rejected", "limit:size", f"br body over {limit}")
    return Dropped("skipped", _reason_key("content_encoding", encoding))


_HTML_SNIFF = re.compile(rb"^\s*(?:\xef\xbb\xbf)?\s*(?:<!--.*?-->\s*)*<(?:!doctype\s+html|html|head|body)",
                         re.I | re.S)


def looks_like_html(body: bytes) -> bool:
    """Content sniffing for responses without a Content-Type (the start of the WHATWG rules)."""
    return bool(_HTML_SNIFF.match(body[:1024]))


def _http_document(base: dict, block: bytes, truncated: bool, limit: int) -> dict | Dropped:
    """The document of an HTTP response block, or why there is none."""
    end, body_start = _header_end(block, 0, MAX_HEADER_BYTES)
    if end < 0:
        if not block.startswith(b"HTTP/") or len(block) > MAX_HEADER_BYTES:
            return Dropped("unreadable", "http:malformed", "no HTTP header block")
        end = body_start = len(block)
    status_line, headers = _parse_headers(block[:end])
    parts = status_line.split()
    if not status_line.startswith("HTTP/") or len(parts) < 2:
        return Dropped("unreadable", "http:malformed", f"status line {status_line[:60]!r}")
    if not (parts[1].isdigit() and parts[1].startswith("2")):
        return Dropped("skipped", _reason_key("http_status", parts[1][:1] + "xx"))
    content_type = headers.get("content-type", "")
    body = block[body_start:]
    if "html" not in content_type.lower():
        if content_type or not looks_like_html(body):
            return Dropped("skipped", _reason_key("content_type", content_type.split(";")[0]))
    if truncated:
        return Dropped("rejected", "limit:size", f"record over {limit} bytes")
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = _dechunk(body) or body  # what a browser shows when the chunking is broken
    body = _decode_content(body, headers.get("content-encoding", ""), limit)
    if isinstance(body, Dropped):
        return body
    return {**base, "html": body, "content_type": content_type}


def _warc_document(fields: dict[str, str], block: bytes, truncated: bool, limit: int) -> dict | Dropped:
    kind = fields.get("warc-type", "").lower()
    base = {"id": fields.get("warc-record-id", ""), "url": fields.get("warc-target-uri", ""),
            "date": fields.get("warc-date", "")}
    if kind == "response":
        if not block.startswith(b"HTTP/"):
            return Dropped("skipped", _reason_key("response", base["url"].partition(":")[0] or "not_http"))
        return _http_document(base, block, truncated, limit)
    if kind in ("resource", "conversion"):
        content_type = fields.get("content-type", "")
        if truncated:
            return Dropped("rejected", "limit:size", f"record over {limit} bytes")
        if kind == "resource" and "html" in content_type.lower():
            return {**base, "html": block, "content_type": content_type}
        if kind == "conversion" or content_type.lower().startswith("text/plain"):
            return {**base, "text": block.decode("utf-8", "replace")}
        return Dropped("skipped", _reason_key(f"{kind}:content_type", content_type.split(";")[0]))
    return Dropped("skipped", _reason_key("warc_type", kind))


def _arc_document(line: str, block: bytes, truncated: bool, limit: int) -> dict | Dropped:
    """ARC (the format before WARC): `url ip date mime length` (v1) or longer (v2), then the block."""
    parts = line.split(" ")
    if parts[0].startswith("filedesc:"):
        return Dropped("skipped", "arc:filedesc")
    base = {"id": f"{parts[0]} {parts[2] if len(parts) > 2 else ''}".strip(), "url": parts[0],
            "date": parts[2] if len(parts) > 2 else ""}
    if not block.startswith(b"HTTP/"):
        return Dropped("skipped", _reason_key("response", parts[0].partition(":")[0]))
    return _http_document(base, block, truncated, limit)


_NOT_SEPARATOR = re.compile(rb"[^\r\n\t \x00]")
_RECORD_START = {"warc": re.compile(rb"\nWARC/\d"),
                 "arc": re.compile(rb"\n(?=\S+ \S+ \d{14} [^\n]* \d+\n)")}
_ARC_START = re.compile(rb"\S+ \S+ \d{14} ")
_ARC_HEADER = re.compile(r"\S+ \S+ \d{14} .* \d+|\S+ \S+ \d{14}  ?\d+")


class _RecordParser:
    """Records of a WARC or ARC byte stream (with gaps), as documents and `Dropped`s.

    `buf[p:]` holds the bytes not yet parsed. A gap in the stream costs the record it cuts (or, between
    records, the record it swallowed); junk costs one `malformed` count however long it is."""

    def __init__(self, items: Iterator[bytes | _Gap], path: str, limit: int):
        self.items, self.path, self.limit = iter(items), path, limit
        self.buf, self.p = bytearray(), 0
        self.gap: _Gap | None = None
        self.eof = False
        self.format = "warc"

    def _more(self) -> bool:
        """Append the next bytes of the stream; False at the end (`eof`) or at a gap (`gap`)."""
        if self.eof or self.gap:
            return False
        item = next(self.items, None)
        if item is None:
            self.eof = True
            return False
        if isinstance(item, _Gap):
            self.gap = item
            return False
        self.buf += item
        return True

    def _fail(self, reason: str, detail: str) -> Dropped:
        return Dropped("unreadable", f"{self.format}:{reason}", f"{self.path}: {detail}")

    def _cut(self, part: str) -> Dropped:
        """The record being read ends early: at a gap, or at the end of the input."""
        if self.gap is not None:
            gap, self.gap = self.gap, None
            self.buf, self.p = bytearray(), 0  # the next gzip member starts clean
            return Dropped("unreadable", gap.reason, gap.detail)
        self.p = len(self.buf)
        return self._fail("truncated", f"the last record's {part} is cut short")

    def _resync(self) -> None:
        """Skip junk up to the next record start, across gaps (they are part of the junk)."""
        pattern = _RECORD_START[self.format]
        start = self.p + 1
        while True:
            m = pattern.search(self.buf, start)
            if m:
                self.p = m.start() + 1
                return
            del self.buf[:max(len(self.buf) - 64, 0)]
            self.p, start = 0, 0
            if not self._more():
                if self.eof:
                    self.p = len(self.buf)
                    return
                self.gap, self.buf = None, bytearray()
                if self._more() and self._record_starts():
                    return

    def _record_starts(self) -> bool:
        head = bytes(self.buf[self.p:self.p + 512])
        if self.format == "warc":
            return head.startswith(b"WARC/")
        return bool(_ARC_START.match(head))

    def __iter__(self) -> Iterator[dict | Dropped]:
        while True:
            if self.p > CHUNK:  # records before p are done
                del self.buf[:self.p]
                self.p = 0
            m = _NOT_SEPARATOR.search(self.buf, self.p)  # skip the blank lines between records
            while m is None:
                self.buf, self.p = bytearray(), 0
                if not self._more():
                    if self.eof:
                        return
                    yield self._cut("whole")  # a gzip member lost between records
                m = _NOT_SEPARATOR.search(self.buf)
            self.p = m.start()
            while len(self.buf) - self.p < 512 and self._more():
                pass
            if self.buf.startswith(b"filedesc:", self.p):
                self.format = "arc"
            if not self._record_starts():
                if self.gap is not None and len(self.buf) - self.p < 16:
                    yield self._cut("header")
                    continue
                detail = f"offset {self.p} of the stream: no {self.format.upper()} record at " \
                         f"{bytes(self.buf[self.p:self.p + 24])!r}"
                self._resync()
                yield self._fail("malformed", detail)
                continue
            yield self._record()

    def _record(self) -> dict | Dropped:
        start = self.p
        while True:  # the header block
            if self.format == "warc":
                end, body = _header_end(self.buf, start, start + MAX_HEADER_BYTES)
            else:
                end = self.buf.find(b"\n", start, start + MAX_HEADER_BYTES)
                body = end + 1
            if end >= 0:
                break
            if len(self.buf) - start > MAX_HEADER_BYTES:
                self._resync()
                return self._fail("malformed", f"a header block over {MAX_HEADER_BYTES} bytes")
            if not self._more():
                return self._cut("header")
        first, fields = _parse_headers(bytes(self.buf[start:end]))
        if self.format == "arc":
            if not _ARC_HEADER.fullmatch(first):
                self._resync()
                return self._fail("malformed", f"ARC header {first[:60]!r}")
            length = first.rsplit(" ", 1)[1]
        else:
            length = fields.get("content-length", "")
        if not length.isdigit():
            self._resync()
            return self._fail("malformed", f"Content-Length {length[:20]!r}")
        length = int(length)
        keep = min(length, self.limit + MAX_HEADER_BYTES)  # an oversized block is read this far only
        while len(self.buf) < body + keep:
            if not self._more():
                return self._cut("block")
        block = bytes(self.buf[body:body + keep])
        if keep < length and not self._skip(body + length):
            return self._cut("block")
        self.p = body + length if keep == length else self.p
        truncated = length > self.limit
        if self.format == "warc":
            return _warc_document(fields, block, truncated, self.limit)
        return _arc_document(first, block, truncated, self.limit)

    def _skip(self, end: int) -> bool:
        """Move `p` to `end`, discarding the bytes before it as they stream in; False if cut."""
        while len(self.buf) < end:
            end -= len(self.buf)
            self.buf = bytearray()
            if not self._more():
                return False
        self.p = end
        return True


def read_warc(path: str, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[dict | Dropped]:
    """Documents of a WARC (or ARC) file: HTML `response` and `resource` records and WET
    `conversion` records (plain text); a `Dropped` for every other record."""
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Dropped("unreadable", "file:unreadable", f"{path}: {e}")
        return
    with f:
        yield from _RecordParser(_stream(f, path), path, max_document_bytes)


# --- JSONL and text files -------------------------------------------------------------------------------

def _lines(items: Iterator[bytes | _Gap], limit: int) -> Iterator[tuple[bytes, bool] | _Gap | Dropped]:
    """Lines of a byte stream as (line, ended with a newline); a gap cuts the line it falls in.
    A line longer than `limit` is streamed past and reported as rejected."""
    tail, skipping = b"", False
    for item in items:
        if isinstance(item, _Gap):
            tail, skipping = b"", False
            yield item
            continue
        lines = (tail + item).split(b"\n")
        tail = lines.pop()
        for line in lines:
            if skipping:
                skipping = False
                continue
            yield line, True
        if len(tail) > limit:
            if not skipping:
                yield Dropped("rejected", "limit:size", f"a line over {limit} bytes")
            tail, skipping = b"", True
    if tail and not skipping:
        yield tail, False


def _fix_surrogates(value):
    """Lone UTF-16 surrogates (valid JSON escapes, not encodable as UTF-8) become U+FFFD."""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if isinstance(value, list):
        return [_fix_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_fix_surrogates(k): _fix_surrogates(v) for k, v in value.items()}
    return value


def read_jsonl(path: str, text_field: str = "text", max_document_bytes: int = MAX_DOCUMENT_BYTES,
               name: str | None = None) -> Iterator[dict | Dropped]:
    """Records of a JSONL file (gzipped or not): each non-blank line is a document or a Dropped."""
    name = name or Path(path).name
    try:
        f = open(path, "rb")
    except OSError as e:
        yield Dropped("unreadable", "file:unreadable", f"{path}: {e}")
        return
    with f:
        lineno = 0
        for item in _lines(_stream(f, path), max_document_bytes):
            lineno += 1
            if isinstance(item, (_Gap, Dropped)):
                yield (item if isinstance(item, Dropped) else
                       Dropped("unreadable", item.reason, f"{item.detail} (near line {lineno})"))
                continue
            line, complete = item
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as e:
                yield Dropped("unreadable", "jsonl:invalid_utf8", f"{where}: {e}")
                continue
            except json.JSONDecodeError as e:
                reason = "jsonl:malformed" if complete else "jsonl:truncated"
                yield Dropped("unreadable", reason, f"{where}: {e.msg}")
                continue
            except RecursionError:
                yield Dropped("unreadable", "jsonl:malformed", f"{where}: nested too deeply")
                continue
            if not isinstance(record, dict):
                yield Dropped("unreadable", "jsonl:not_an_object", f"{where}: {type(record).__name__}")
                continue
            if b"\\ud" in line or b"\\uD" in line:
                record = _fix_surrogates(record)
            text = record.pop(text_field, None)
            if not isinstance(text, str):
                reason = "jsonl:no_text" if text is None else "jsonl:text_not_a_string"
                yield Dropped("skipped", reason, f"{where}: field {text_field!r}")
                continue
            record["text"] = text
            record.setdefault("id", f"{name}:{lineno}")
            yield record


def read_text_file(path: str, max_document_bytes: int = MAX_DOCUMENT_BYTES) -> dict | Dropped:
    """One document: the file as UTF-8, or Windows-1252 when it is not valid UTF-8."""
    try:
        if Path(path).stat().st_size > max_document_bytes:
            return Dropped("rejected", "limit:size", f"{path}: over {max_document_bytes} bytes")
        raw = Path(path).read_bytes()
    except OSError as e:
        return Dropped("unreadable", "file:unreadable", f"{path}: {e}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return {"id": path, "text": text}


def read_shard(shard: Shard, text_field: str = "text",
               max_document_bytes: int = MAX_DOCUMENT_BYTES) -> Iterator[dict | Dropped]:
    """Every record of the shard's files, in order: documents and `Dropped`s."""
    if shard.kind == "warc":
        yield from read_warc(shard.paths[0], max_document_bytes)
    elif shard.kind == "jsonl":
        yield from read_jsonl(shard.paths[0], text_field, max_document_bytes, shard.name)
    else:
        for path in shard.paths:
            yield read_text_file(path, max_document_bytes)
