"""Per-document limits: size, nesting depth and CPU time, each rejected with its own reason.

Untrusted HTML can make a parser slow: resiliparse's main-content extraction is quadratic in the
nesting depth of `<div>`s (20,000 nested tags: about 30 s for one page). A time limit cannot stop C
code with a signal, so the limits work in two steps:

1. A cheap pre-scan before any parser runs. Size (`limit:size`) is checked by the readers as they
   stream (an oversized record is never held in memory). `nesting_depth` estimates the element
   depth from the bytes in numpy (about 1 ms per MB) and `limit:depth` rejects deep pages before a
   parser sees them.
2. A CPU-time limit per document (`limit:time`) through `SIGVTALRM`: it interrupts Python code (the
   standard-library extractor, language identification, rules) where it is; C code (resiliparse,
   one regular-expression call) is interrupted as soon as it returns, so such a document is still
   rejected, late. It works in the main thread of a Unix process (the pipeline's processes and
   pool workers); elsewhere it is off, and the pre-scan is what protects the run.
"""

from __future__ import annotations

import signal
import threading

import numpy as np


class DocumentLimit(Exception):
    """A document exceeded a limit; `reason` is its report key ('limit:depth', 'limit:time')."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _tag_key(name: bytes) -> int:
    """The little-endian uint64 of a tag name's first 8 bytes, as `nesting_depth` computes it."""
    return int.from_bytes(name[:8].ljust(8, b"\0"), "little")


# Elements that never stay open: void elements, and those whose end tag HTML leaves implied
# (a new <p> or <li> closes the previous one, so they do not nest in practice).
NOT_NESTING = {_tag_key(t) for t in (
    b"area", b"base", b"br", b"col", b"embed", b"hr", b"img", b"input", b"link", b"meta", b"param",
    b"source", b"track", b"wbr", b"keygen", b"frame", b"basefont", b"bgsound", b"image",
    b"p", b"li", b"dt", b"dd", b"option", b"optgroup", b"tr", b"td", b"th", b"thead", b"tbody",
    b"tfoot", b"rb", b"rt", b"rp", b"rtc", b"colgroup", b"caption", b"html", b"head", b"body")}
_NOT_NESTING = np.array(sorted(NOT_NESTING), dtype=np.uint64)
_NAME_BYTE = np.zeros(256, dtype=bool)
_NAME_BYTE[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1), *range(ord("0"), ord("9") + 1),
            ord("-"), ord(":"), ord("_")]] = True
_LETTER = np.zeros(256, dtype=bool)
_LETTER[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1)]] = True


def nesting_depth(html: bytes) -> int:
    """Upper estimate of the element nesting depth of an HTML page (ASCII-compatible bytes).

    Each `<name` opens and each `</name` closes, except the elements in NOT_NESTING and
    self-closed `<name ... />`; the depth is the running total's maximum, where a stray end tag
    never takes it below zero (a parser ignores those). Where an end tag closes elements left
    open inside it, the estimate stays high: it is an upper bound for balanced markup."""
    a = np.frombuffer(html, dtype=np.uint8)
    lt = np.flatnonzero(a[:-1] == ord("<"))
    if len(lt) == 0:
        return 0
    closing = a[lt + 1] == ord("/")
    name_at = lt + 1 + closing
    ok = name_at < len(a)
    lt, closing, name_at = lt[ok], closing[ok], name_at[ok]
    ok = _LETTER[a[name_at]]
    lt, closing, name_at = lt[ok], closing[ok], name_at[ok]
    if len(lt) == 0:
        return 0
    window = a[np.minimum(name_at[:, None] + np.arange(8), len(a) - 1)]  # (tags, 8) name bytes
    in_name = np.logical_and.accumulate(_NAME_BYTE[window], axis=1)
    in_name &= name_at[:, None] + np.arange(8) < len(a)
    lowered = np.where(in_name, window | 0x20, 0).astype(np.uint8)  # ASCII letters to lower case
    lowered = np.where(in_name & ~_LETTER[window], window, lowered)  # digits, '-', ':' unchanged
    keys = np.ascontiguousarray(lowered).view("<u8").ravel()
    counted = ~np.isin(keys, _NOT_NESTING)
    gt = np.flatnonzero(a == ord(">"))
    end = np.searchsorted(gt, lt)  # the '>' that ends each tag
    has_end = end < len(gt)
    self_closed = np.zeros(len(lt), dtype=bool)
    self_closed[has_end] = a[gt[end[has_end]] - 1] == ord("/")
    step = np.where(closing, -1, 1) * (counted & ~(self_closed & ~closing))
    total = np.cumsum(step)
    return int(np.max(total - np.minimum.accumulate(np.minimum(total, 0)), initial=0))


class CpuTimeLimit:
    """A limit on the CPU seconds one document may take, through SIGVTALRM.

        with CpuTimeLimit(5.0) as limit:      # installs the handler (once per shard)
            for doc in docs:
                try:
                    limit.start(); work(doc); limit.stop()
                except DocumentLimit: limit.stop(); ...

    Off (`active` False) when `seconds` <= 0, outside the main thread, or without setitimer."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.active = (seconds > 0 and hasattr(signal, "setitimer")
                       and threading.current_thread() is threading.main_thread())
        self.armed = False
        self._previous = None

    def _expired(self, signum, frame):
        if self.armed:  # a signal that lands just after stop() is ignored
            self.armed = False
            raise DocumentLimit("limit:time", f"over {self.seconds} s of CPU time")

    def __enter__(self) -> "CpuTimeLimit":
        if self.active:
            self._previous = signal.signal(signal.SIGVTALRM, self._expired)
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.stop()
            signal.signal(signal.SIGVTALRM, self._previous or signal.SIG_DFL)

    def start(self) -> None:
        if self.active:
            self.armed = True
            signal.setitimer(signal.ITIMER_VIRTUAL, self.seconds)

    def stop(self) -> None:
        if self.active:
            self.armed = False
            signal.setitimer(signal.ITIMER_VIRTUAL, 0)
