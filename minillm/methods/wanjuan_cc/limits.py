"""Per-document limits: size, nesting depth and CPU time, each rejected with its own reason.

Untrusted HTML can make a parser slow: resiliparse's main-content extraction is quadratic in the
nesting depth of `<div>`s (on the dev machine 3,000 nested: 0.3 s, 5,000: 0.7 s, 50,000: minutes). A time limit cannot stop C
code with a signal, so the limits work in two steps:

1. A cheap pre-scan before any parser runs. Size (`limit:size`) is checked by the readers as they
   stream (an oversized record is never held in memory). `nesting_depth` estimates the element
   depth from the bytes in numpy (about 5 ms per MB) and `limit:depth` rejects deep pages before a
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
_NAME_BYTE = np.zeros(256, dtype=bool)  # bytes of a tag name; `| 0x20` lower-cases them all
_NAME_BYTE[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1), *range(ord("0"), ord("9") + 1),
            ord("-"), ord(":")]] = True
_LETTER = np.zeros(256, dtype=bool)
_LETTER[[*range(ord("a"), ord("z") + 1), *range(ord("A"), ord("Z") + 1)]] = True
_EIGHT = np.arange(8)


def nesting_depth(html: bytes) -> int:
    """Upper estimate of the element nesting depth of an HTML page (ASCII-compatible bytes).

    Each `<name` opens and each `</name` closes, except the elements in NOT_NESTING and
    self-closed `<name ... />`; the depth is the running total's maximum, where a stray end tag
    never takes it below zero (a parser ignores those). Where an end tag closes elements left
    open inside it, the estimate stays high: it is an upper bound for balanced markup."""
    if b"<" not in html:
        return 0
    a = np.frombuffer(html + bytes(10), dtype=np.uint8)  # zero padding: windows never run off the end
    lt = np.flatnonzero(a == ord("<"))
    closing = a[lt + 1] == ord("/")
    name_at = lt + 1 + closing
    ok = _LETTER[a[name_at]]
    lt, closing, name_at = lt[ok], closing[ok], name_at[ok]
    window = a[name_at[:, None] + _EIGHT]  # (tags, 8): the first 8 bytes of each name
    in_name = np.logical_and.accumulate(_NAME_BYTE[window], axis=1)
    keys = np.where(in_name, window | 0x20, 0).astype(np.uint8).view("<u8").ravel()
    slot = np.minimum(np.searchsorted(_NOT_NESTING, keys), len(_NOT_NESTING) - 1)
    counted = _NOT_NESTING[slot] != keys
    gt = np.flatnonzero(a == ord(">"))
    end = np.searchsorted(gt, lt)  # the '>' that ends each tag
    self_closed = a[gt[np.minimum(end, len(gt) - 1)] - 1] == ord("/") if len(gt) else np.zeros(len(lt), bool)
    self_closed &= end < len(gt)
    step = np.where(closing, -1, 1) * (counted & (closing | ~self_closed))
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
