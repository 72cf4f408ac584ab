"""Build WARC files of HTTP responses from local HTML files, as an offline stand-in for Common Crawl.

    apt-get install python3.11-doc linux-doc-6.1   # 530 + 3,186 real HTML pages
    python scripts/make_example_warc.py --html /usr/share/doc/python3.11-doc/html --out data/example.warc.gz
    python scripts/make_example_warc.py --html /usr/share/doc/python3.11-doc/html \
        /usr/share/doc/linux-doc-6.1/html --max-pages 0 --shards 4 --out data/docs.warc.gz

Each HTML file becomes a `response` record with an HTTP header (Content-Type text/html) and a URL
under https://docs.example.org/; a few exact and near copies (a word changed here and there) are
added under other URLs so that deduplication has something to find. Each response is preceded by
its `request` record, as crawlers write them. With `--shards N` the pages are dealt round-robin into
N files named like `--out` with `-00000` ... before the suffix. Needs warcio (`.[data]`).
"""

import io
import random
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from minillm.cli import ArgumentParser
from minillm.errors import UserError, run_main


def shard_paths(out: str, shards: int) -> list[Path]:
    if shards == 1:
        return [Path(out)]
    name = Path(out).name
    stem, dot, suffix = name.partition(".")
    return [Path(out).with_name(f"{stem}-{k:05d}{dot}{suffix}") for k in range(shards)]


def main(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--html", required=True, nargs="+", help="folders of .html files")
    ap.add_argument("--out", required=True, help="WARC file to write (.warc.gz, or .warc uncompressed)")
    ap.add_argument("--max-pages", type=int, default=300, help="0 for all pages")
    ap.add_argument("--near-copies", type=int, default=20, help="pages to copy with small edits")
    ap.add_argument("--shards", type=int, default=1, help="number of WARC files to deal pages into")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.shards < 1:
        raise UserError(f"--shards must be at least 1, got {args.shards}")
    pages: list[tuple[Path, Path]] = []
    for folder in map(Path, args.html):
        if not folder.is_dir():
            raise UserError(f"--html {folder}: not a folder (apt-get install python3.11-doc?)")
        pages += [(folder, p) for p in sorted(folder.rglob("*.html"))]
    if args.max_pages:
        pages = pages[:args.max_pages]
    if not pages:
        raise UserError(f"no .html files under {' '.join(args.html)}")
    rng = random.Random(args.seed)
    copies = rng.sample(pages, min(args.near_copies, len(pages)))
    paths = shard_paths(args.out, args.shards)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    files = [open(p, "wb") for p in paths]
    writers = [WARCWriter(f, gzip=str(p).endswith(".gz")) for f, p in zip(files, paths)]
    count = 0

    def write(url: str, body: bytes):
        nonlocal count
        writer = writers[count % len(writers)]
        count += 1
        request = StatusAndHeaders("GET / HTTP/1.1", [("Host", url.split("/")[2])], is_http_request=True)
        writer.write_record(writer.create_warc_record(url, "request", http_headers=request))
        headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                   protocol="HTTP/1.1")
        writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                      http_headers=headers))

    for folder, page in pages:
        write(f"https://docs.example.org/{folder.name}/{page.relative_to(folder)}", page.read_bytes())
    for i, (folder, page) in enumerate(copies):
        words = page.read_text(errors="replace").split(" ")
        for _ in range(max(len(words) // 200, 1)):  # about 0.5% of the words change
            words[rng.randrange(len(words))] = "changed"
        write(f"https://mirror{i}.example.net/{page.name}", " ".join(words).encode())
    for f in files:
        f.close()
    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} ... {paths[-1].name}"
    print(f"wrote {where}: {len(pages)} pages + {len(copies)} near copies")


if __name__ == "__main__":
    run_main(main)
