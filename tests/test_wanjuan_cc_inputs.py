"""WanJuan-CC on hostile input: every case of issue 13 as a whole-pipeline run that must finish,
keep every good record, and count every bad one under its reason; the report must balance."""

import gzip
import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm.corpus import stdlib_docstrings
from minillm.errors import UserError
from minillm.methods.wanjuan_cc import PipelineConfig, run
from minillm.methods.wanjuan_cc.extract import decode_html, extract_text
from minillm.methods.wanjuan_cc.language import LanguageFilter
from minillm.methods.wanjuan_cc.limits import CpuTimeLimit, DocumentLimit, nesting_depth
from minillm.minhash import exact_jaccard
from minillm.methods.wanjuan_cc.read import Dropped, read_jsonl, read_warc
from minillm.methods.wanjuan_cc.rules import RuleSet

warcio = pytest.importorskip("warcio")
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prose():
    """Twelve distinct English texts that pass the language and rule filters (and no near-copies)."""
    docs, keep, rules = [], LanguageFilter(), RuleSet()
    for d in stdlib_docstrings():
        d = " ".join(d.split())
        if (len(d.split()) >= 80 and keep({"text": d}) is None and rules.check(d) is None
                and all(exact_jaccard(d, o) < 0.3 for o in docs)):
            docs.append(d)
            if len(docs) == 12:
                break
    assert len(docs) == 12
    return docs


def page(text: str, title: str = "T") -> bytes:
    return f"<html><head><title>{title}</title></head><body><p>{text}</p></body></html>".encode()


def warc_bytes(records, compress=True) -> bytes:
    """records: (url, body bytes, content type or None, WARC type)."""
    out = io.BytesIO()
    writer = WARCWriter(out, gzip=compress)
    for url, body, content_type, kind in records:
        if kind == "response":
            headers = [("Content-Type", content_type)] if content_type else []
            http = StatusAndHeaders("200 OK", headers, protocol="HTTP/1.1")
            record = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
        elif kind == "request":
            http = StatusAndHeaders("GET / HTTP/1.1", [("Host", "x")], is_http_request=True)
            record = writer.create_warc_record(url, "request", http_headers=http)
        else:
            record = writer.create_warc_record(url, kind, payload=io.BytesIO(body),
                                               warc_content_type=content_type or "application/octet-stream")
        writer.write_record(record)
    return out.getvalue()


def pages(docs, prefix="https://site.example/") -> list:
    return [(f"{prefix}{i}", page(d), "text/html; charset=utf-8", "response") for i, d in enumerate(docs)]


def run_on(tmp_path, files: dict[str, bytes], **cfg) -> tuple[dict, list[dict]]:
    inputs = tmp_path / "in"
    inputs.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (inputs / name).write_bytes(data)
    out = tmp_path / "out"
    report = run(PipelineConfig(inputs=[str(inputs)], out_dir=str(out), **cfg))
    records = [json.loads(line) for p in sorted((out / "final").glob("*.jsonl.gz"))
               for line in gzip.open(p, "rt", encoding="utf-8")]
    assert report["read"] == (report["kept"] + sum(report["rejected"].values())
                              + sum(report["skipped"].values()) + sum(report["unreadable"].values()))
    return report, records


def urls(records) -> set[str]:
    return {r.get("url") for r in records}


# --- crashes that used to abort the run --------------------------------------------------------------

@pytest.mark.parametrize("name,junk", [
    ("random.warc", os.urandom(20_000)),
    ("random.warc.gz", os.urandom(20_000)),
    ("gzip_of_random.warc.gz", gzip.compress(os.urandom(20_000))),
])
def test_random_bytes_named_warc_are_one_unreadable_file(tmp_path, prose, name, junk):
    good = warc_bytes(pages(prose[:3]))
    report, records = run_on(tmp_path, {"good.warc.gz": good, name: junk})
    assert urls(records) == {f"https://site.example/{i}" for i in range(3)}
    assert sum(report["unreadable"].values()) == 1
    assert any(name in path for path in report["errors"])


def test_valid_warc_followed_by_junk_keeps_the_records(tmp_path, prose):
    for suffix, compress in (("warc.gz", True), ("warc", False)):
        report, records = run_on(tmp_path / suffix, {f"a.{suffix}": warc_bytes(pages(prose[:3]), compress)
                                                     + b"\r\n" + os.urandom(3000)})
        assert len(records) == 3 and sum(report["unreadable"].values()) == 1


def bad_jsonl(texts: list[str], prefix: str = "") -> bytes:
    """Two good records around every kind of bad line; `texts`: five distinct texts."""
    lines = [json.dumps({"id": f"{prefix}ok0", "text": texts[0]}).encode(),
             b'{"id": "bad-utf8", "text": "caf\xe9 ' + texts[1].encode() + b'"}',  # a Latin-1 byte
             b'{"id": "malformed", "text": ',
             json.dumps({"id": "null", "text": None}).encode(),
             json.dumps({"id": "number", "text": 3}).encode(),
             b'["not", "an", "object"]',
             json.dumps({"id": f"{prefix}surrogate", "text": texts[2] + " \ud800"}).encode(),  # lone surrogate
             json.dumps({"id": f"{prefix}url", "text": texts[3], "url": 12345}).encode(),  # non-string url
             json.dumps({"id": f"{prefix}ok1", "text": texts[4]}).encode()]
    return b"\n".join(lines) + b"\n"


def test_jsonl_with_bad_lines_loses_only_those_lines(tmp_path, prose):
    report, records = run_on(tmp_path, {"a.jsonl": bad_jsonl(prose[:5]),
                                        "b.jsonl.gz": bad_jsonl(prose[5:10], "gz-")})  # b: not gzip
    ids = {r["id"] for r in records}
    assert ids == {f"{p}{i}" for p in ("", "gz-") for i in ("ok0", "ok1", "surrogate", "url")}
    assert "\ufffd" in next(r for r in records if r["id"] == "surrogate")["text"]
    assert report["unreadable"] == {"jsonl:invalid_utf8": 2, "jsonl:malformed": 2, "jsonl:not_an_object": 2}
    assert report["skipped"] == {"jsonl:no_text": 2, "jsonl:text_not_a_string": 2}


def test_non_string_url_does_not_crash_safety(tmp_path, prose):
    blocked = tmp_path / "blocked.txt"
    blocked.write_text("bad.example\n")
    data = "".join(json.dumps({"id": f"d{i}", "text": t, "url": u}) + "\n"
                   for i, (t, u) in enumerate(zip(prose[:4], [None, 7, ["x"], "https://bad.example/p"])))
    report, records = run_on(tmp_path, {"a.jsonl": data.encode()}, blocked_domains=str(blocked))
    assert {r["id"] for r in records} == {"d0", "d1", "d2"}
    assert report["rejected"] == {"safety:blocked_domain": 1}


# --- silent losses ------------------------------------------------------------------------------------

def test_corrupt_gzip_member_costs_only_its_record(tmp_path, prose):
    records = pages(prose[:6])
    members = [warc_bytes([r]) for r in records]
    broken = bytearray(members[2])
    broken[len(broken) // 2] ^= 0xFF  # a flipped byte inside the third member's deflate data
    broken[len(broken) // 2 + 1] ^= 0xFF
    data = b"".join(members[:2]) + bytes(broken) + b"".join(members[3:])
    report, kept = run_on(tmp_path, {"a.warc.gz": data})
    assert urls(kept) == {r[0] for i, r in enumerate(records) if i != 2}
    assert report["unreadable"] == {"gzip:corrupt": 1}


@pytest.mark.parametrize("compress", [True, False])
def test_truncated_last_record_is_counted_not_kept(tmp_path, prose, compress):
    records = pages(prose[:4])
    whole = warc_bytes(records, compress)
    last = len(warc_bytes(records[-1:], compress))
    data = whole[:len(whole) - last // 2]  # the last record is cut in half
    report, kept = run_on(tmp_path, {"a.warc.gz" if compress else "a.warc": data})
    assert urls(kept) == {r[0] for r in records[:3]}
    assert report["unreadable"] == ({"gzip:truncated": 1} if compress else {"warc:truncated": 1})


def test_member_larger_than_a_read_chunk_then_more_members(tmp_path, prose):
    """A gzip member that decompresses to more than the reader's output limit (1 MiB a call)."""
    big = page(" ".join([prose[0]] * 20000))  # ~12 MB of HTML, compresses to ~100 KB
    records = [("https://site.example/big", big, "text/html", "response")] + pages(prose[1:4])
    items = list(read_warc(_write(tmp_path / "a.warc.gz", warc_bytes(records)), max_document_bytes=1 << 25))
    assert [i["url"] for i in items] == [r[0] for r in records] and items[0]["html"] == big


def test_every_record_type_is_accounted_for(tmp_path, prose):
    records = pages(prose[:2]) + [
        ("https://site.example/req", b"", None, "request"),
        ("https://site.example/meta", b"fetchTimeMs: 12\r\n", "application/warc-fields", "metadata"),
        ("https://site.example/res.html", page(prose[5]), "text/html", "resource"),
        ("https://site.example/res.png", b"\x89PNG\r\n\x1a\n....", "image/png", "resource"),
        ("https://site.example/a.pdf", b"%PDF-1.4 ...", "application/pdf", "response"),
        ("https://site.example/a.png", b"\x89PNG\r\n\x1a\n....", "image/png", "response"),
        ("https://site.example/no-type-html", page(prose[6]), None, "response"),
        ("https://site.example/no-type-bin", b"\x00\x01binary", None, "response"),
    ]
    report, kept = run_on(tmp_path, {"a.warc.gz": warc_bytes(records)})
    assert report["read"] == len(records)
    assert urls(kept) == {"https://site.example/0", "https://site.example/1",
                          "https://site.example/res.html", "https://site.example/no-type-html"}
    assert report["skipped"] == {"warc_type:request": 1, "warc_type:metadata": 1,
                                 "resource:content_type:image/png": 1, "content_type:application/pdf": 1,
                                 "content_type:image/png": 1, "content_type:missing": 1}


# --- limits -------------------------------------------------------------------------------------------

def test_deeply_nested_page_is_rejected_before_parsing(tmp_path, prose):
    pytest.importorskip("resiliparse")
    deep = b"<html><body>" + b"<div>" * 50_000 + prose[0].encode() + b"</div>" * 50_000 + b"</body></html>"
    records = pages(prose[:2]) + [("https://site.example/deep", deep, "text/html", "response")]
    start = time.perf_counter()
    report, kept = run_on(tmp_path, {"a.warc.gz": warc_bytes(records)}, extractor="resiliparse")
    assert time.perf_counter() - start < 20  # resiliparse alone takes minutes on this page
    assert report["rejected"] == {"limit:depth": 1} and len(kept) == 2


def test_oversized_documents_are_rejected_as_they_stream(tmp_path, prose):
    huge = page(prose[0] + " word" * 300_000)  # about 1.5 MB
    records = pages(prose[1:3]) + [("https://site.example/huge", huge, "text/html", "response")]
    jsonl = (json.dumps({"text": prose[3] + " word" * 300_000}) + "\n" + json.dumps({"text": prose[4]}) + "\n")
    report, kept = run_on(tmp_path, {"a.warc.gz": warc_bytes(records), "b.jsonl": jsonl.encode()},
                          max_document_bytes=1_000_000)
    assert report["rejected"] == {"limit:size": 2} and len(kept) == 3


def test_time_limit_rejects_a_slow_document_and_the_run_goes_on(tmp_path, prose, monkeypatch):
    from minillm.methods.wanjuan_cc import pipeline

    def slow_on_marker(html, content_type=None, backend="stdlib"):
        if "SLOW" in html:
            while True:  # Python code: the CPU-time signal interrupts it
                pass
        return extract_text(html, content_type, backend)

    monkeypatch.setattr(pipeline, "extract_text", slow_on_marker)
    records = pages(prose[:3]) + [("https://site.example/slow", page("SLOW " + prose[4]), "text/html", "response")]
    report, kept = run_on(tmp_path, {"a.warc.gz": warc_bytes(records)}, max_seconds=0.2)
    assert report["rejected"] == {"limit:time": 1} and len(kept) == 3


def test_cpu_time_limit_is_off_where_signals_cannot_work():
    import threading
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("active", CpuTimeLimit(1.0).active))
    thread.start()
    thread.join()
    assert result["active"] is False and CpuTimeLimit(0).active is False
    with CpuTimeLimit(0.05) as limit, pytest.raises(DocumentLimit, match="limit:time"):
        limit.start()
        while True:
            pass


def test_nesting_depth_counts_elements_that_stay_open():
    assert nesting_depth(b"<div>" * 1000) == 1000
    assert nesting_depth(b"<div></div>" * 1000) == 1
    assert nesting_depth(b"<p>" * 1000 + b"<li>" * 1000 + b"<br>" * 1000) == 0  # implied ends, void
    assert nesting_depth(b"<svg>" + b"<path/>" * 100 + b"</svg>") == 1  # self-closed
    assert nesting_depth(b"</div>" * 10 + b"<DIV>" * 5) == 5  # stray end tags do not go below zero
    assert nesting_depth(b"a < b and c<d") == 1 and nesting_depth(b"<") == 0


# --- charsets -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("label", ["undefined", "base64", "zlib", "rot13", "hex", "utf-7", "x-bogus",
                                   "utf-16"])
def test_bogus_charset_falls_back_to_detection(tmp_path, prose, label):
    body = page(prose[0] + " café")
    records = [("https://site.example/a", body, f"text/html; charset={label}", "response"),
               ("https://site.example/b", body.replace(b"<head>", f'<head><meta charset="{label}">'.encode())
                .replace(prose[0].encode(), prose[1].encode()), "text/html", "response")]
    report, kept = run_on(tmp_path, {"a.warc.gz": warc_bytes(records)})
    assert len(kept) == 2 and all("café" in r["text"] for r in kept)
    assert decode_html("caf\xe9".encode("cp1252"), f"text/html; charset={label}") == "café"  # not UTF-8


def test_labels_and_byte_order_marks_are_honoured():
    assert decode_html("<p>café</p>".encode("latin-1"), "text/html; charset=ISO-8859-1") == "<p>café</p>"
    assert decode_html("<p>€</p>".encode("cp1252"), "text/html; charset=latin-1") == "<p>€</p>"  # as browsers
    assert decode_html('<meta charset="koi8-r"><p>мир</p>'.encode("koi8-r")).endswith("мир</p>")
    assert decode_html("<p>mir</p>".encode("utf-16"), "text/html; charset=utf-8") == "<p>mir</p>"  # BOM wins


# --- strict, the script ---------------------------------------------------------------------------------

def test_strict_fails_on_the_first_unreadable_record(tmp_path, prose):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.warc.gz").write_bytes(warc_bytes(pages(prose[:2])) + os.urandom(500))
    cfg = PipelineConfig(inputs=[str(tmp_path / "in")], out_dir=str(tmp_path / "out"), strict=True)
    with pytest.raises(UserError, match="a.warc.gz"):
        run(cfg)
    cmd = [sys.executable, str(ROOT / "scripts" / "wanjuan_cc.py"), "--inputs", str(tmp_path / "in"),
           "--out-dir", str(tmp_path / "out2")]
    failed = subprocess.run(cmd + ["--strict"], capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and failed.stderr.strip().count("\n") == 0
    assert failed.stderr.startswith("error: ") and "a.warc.gz" in failed.stderr
    lenient = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert lenient.returncode == 0 and "unreadable" in lenient.stdout
    assert "warning: 1 records could not be read" in lenient.stderr


def test_many_hostile_files_in_one_run_lose_nothing_silently(tmp_path, prose):
    cut = warc_bytes(pages(prose[8:12], "https://cut.example/"))
    files = {"good.warc.gz": warc_bytes(pages(prose[:2])),
             "plain.warc": warc_bytes(pages(prose[4:6], "https://other.example/"), compress=False),
             "empty.warc.gz": b"",
             "cut.warc.gz": cut[:-40],
             "junk.jsonl": os.urandom(2000).replace(b"\n", b" ") + b"\n" + json.dumps({"text": prose[6]}).encode(),
             "zeros.warc": bytes(5000),
             "text.txt": prose[7].encode("cp1252", "replace")}
    report, kept = run_on(tmp_path, files)
    assert len(kept) == 2 + 2 + 3 + 1 + 1  # good, plain, cut (minus its last record), jsonl, text
    assert report["unreadable"] == {"gzip:truncated": 1, "jsonl:invalid_utf8": 1}
    assert set(report["errors"]) == {str(tmp_path / "in" / n) for n in ("cut.warc.gz", "junk.jsonl")}


# --- fuzz: arbitrary bytes through the readers and the extractor ------------------------------------------

VALID = warc_bytes([("https://a.example/x", b"<p>hello</p>", "text/html", "response")])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4000), st.sampled_from(["raw", "gzip", "after-valid", "inside-valid"]))
def test_fuzz_readers_never_raise_and_account_for_input(tmp_path, data, how):
    content = data
    if how == "gzip":
        data = gzip.compress(data)
    elif how == "after-valid":
        data = VALID + data
    elif how == "inside-valid":
        cut = len(data) % len(VALID)
        data = VALID[:cut] + data + VALID[cut:]
    path = tmp_path / "f.warc.gz"
    path.write_bytes(data)
    items = list(read_warc(str(path), max_document_bytes=2000))
    for item in items:
        assert isinstance(item, Dropped) or isinstance(item.get("html", item.get("text")), (bytes, str))
        if isinstance(item, Dropped):
            assert item.kind in ("skipped", "unreadable", "rejected") and item.reason
    if how == "after-valid":
        assert any(not isinstance(i, Dropped) and i["url"] == "https://a.example/x" for i in items)
    if content.strip(b"\r\n\t \0"):
        assert items  # bytes that are not blank are never silently ignored
    path.write_bytes(data.replace(b"\x00", b"\n"))
    for item in read_jsonl(str(path)):
        assert isinstance(item, Dropped) or isinstance(item["text"], str)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=3000), st.text(max_size=40))
def test_fuzz_extractor_and_prescan_never_raise(raw, content_type):
    for backend in ("stdlib", "resiliparse"):
        text, title = extract_text(raw, content_type, backend=backend)
        assert isinstance(text, str) and isinstance(title, str)
    assert 0 <= nesting_depth(raw) <= raw.count(b"<")


def test_arc_files_are_read(tmp_path, prose):
    def record(url, body):
        return f"{url} 1.2.3.4 20240101000000 text/html {len(body)}\n".encode() + body + b"\n"
    http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\n"
    desc = b"1 0 Test\nURL IP-address Archive-date Content-type Archive-length\n"
    data = (f"filedesc://t.arc 0.0.0.0 20240101000000 text/plain {len(desc)}\n".encode() + desc + b"\n"
            + record("http://a.example/", http + page(prose[0])) + record("http://b.example/", http + page(prose[1])))
    items = list(read_warc(_write(tmp_path / "t.arc.gz", gzip.compress(data))))
    assert items[0] == Dropped("skipped", "arc:filedesc")
    assert [i["url"] for i in items[1:]] == ["http://a.example/", "http://b.example/"]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def test_chunked_and_compressed_bodies_are_decoded(tmp_path, prose):
    html = page(prose[0])
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(html[i:i + 100]), html[i:i + 100]) for i in range(0, len(html), 100))
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nTransfer-Encoding: chunked\r\n"
           b"Content-Encoding: gzip\r\n\r\n")
    body = gzip.compress(html)
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 100]), body[i:i + 100])
                       for i in range(0, len(body), 100)) + b"0\r\n\r\n"
    block = raw + chunked
    record = (b"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: http://a.example/\r\n"
              b"Content-Length: %d\r\n\r\n" % len(block)) + block + b"\r\n\r\n"
    (item,) = read_warc(_write(tmp_path / "a.warc", record))
    assert item["html"] == html


def test_stdlib_extractor_drops_navigation_bars():
    html = """<html><body><div class="related" role="navigation"><h3>Navigation</h3><ul>
    <li><a href="genindex.html">index</a></li><li><a href="modules.html">modules</a> |</li></ul></div>
    <div class="document"><h1>json — JSON encoder</h1><p>Real content here.</p>
    <pre>    indented(code)\n    more</pre></div>
    <div class="sphinxsidebar"><p>Show Source</p></div>
    <div id="cookie-banner">We use cookies</div><section hidden><p>invisible</p></section>
    <div class="footer">© Copyright</div><p class="has-sidebar">Kept: a layout class.</p></body></html>"""
    text, _ = extract_text(html)
    assert text.split("\n") == ["json — JSON encoder", "Real content here.", "    indented(code)",
                                "    more", "Kept: a layout class."]


def test_workers_share_one_pool_and_match_one_process(tmp_path, prose):
    files = {f"p{k}.warc.gz": warc_bytes(pages(prose[3 * k:3 * k + 3], f"https://s{k}.example/"))
             for k in range(4)}
    one, records_one = run_on(tmp_path / "one", files)
    two, records_two = run_on(tmp_path / "two", files, workers=2)
    assert one == two and records_one == records_two and len(records_one) == 12


def test_pipeline_does_not_import_torch_without_a_quality_model(tmp_path, prose):
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose[:3]))
    code = ("import sys; from minillm.methods.wanjuan_cc import PipelineConfig, run; "
            f"r = run(PipelineConfig(inputs=[{str(tmp_path / 'a.jsonl')!r}], out_dir={str(tmp_path / 'o')!r})); "
            "assert r['kept'] == 3, r; print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_report_lists_errors_and_the_text_line(tmp_path, prose):
    from minillm.methods.wanjuan_cc import format_report
    report, _ = run_on(tmp_path, {"a.warc.gz": warc_bytes(pages(prose[:2])) + b"junk" * 50})
    text = format_report(report)
    assert f"records: {report['read']} read = 2 kept + 0 rejected + 0 skipped + 1 unreadable" in text
    assert "unreadable: gzip:garbage 1" in text and "errors in" in text
    assert random.Random(0)  # the report is deterministic: see test_workers_share_one_pool...


def test_a_stray_quote_does_not_swallow_the_page():
    """A quote opens an attribute value only after '=' (as in HTML5): a damaged tag such as
    `style="margin-top: <li><a href="..."` ends at the '>' after the next quote, not pages later."""
    html = ('<div class="related"><img style="margin-top: changed <li><a href="https://x.example/">'
            'Home</a></li></div><p>Content after the damage.</p><p title="a > b">Second "quoted" block.</p>')
    text, _ = extract_text(html)
    assert text.split("\n") == ["Content after the damage.", 'Second "quoted" block.']
