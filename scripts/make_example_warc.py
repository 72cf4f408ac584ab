"""Build a WARC file of HTTP responses from local HTML files, as an offline stand-in for Common Crawl.

    apt-get install python3.11-doc        # 500+ real HTML pages of the Python documentation
    python scripts/make_example_warc.py --html /usr/share/doc/python3.11-doc/html --out data/example.warc.gz

Each HTML file becomes a `response` record with an HTTP header (Content-Type text/html) and a URL
under https://docs.example.org/; a few exact and near copies (a word changed here and there) are
added under other URLs so that deduplication has something to find. Needs warcio (`.[data]`).
"""

import argparse
import io
import random
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--html", required=True, help="folder of .html files")
    ap.add_argument("--out", required=True, help="WARC file to write (.warc.gz)")
    ap.add_argument("--max-pages", type=int, default=300)
    ap.add_argument("--near-copies", type=int, default=20, help="pages to copy with small edits")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    pages = sorted(Path(args.html).rglob("*.html"))[:args.max_pages]
    if not pages:
        raise SystemExit(f"no .html files under {args.html}")
    rng = random.Random(args.seed)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "wb") as f:
        writer = WARCWriter(f, gzip=args.out.endswith(".gz"))

        def write(url: str, body: bytes):
            headers = StatusAndHeaders("200 OK", [("Content-Type", "text/html; charset=utf-8")],
                                       protocol="HTTP/1.1")
            writer.write_record(writer.create_warc_record(url, "response", payload=io.BytesIO(body),
                                                          http_headers=headers))

        for page in pages:
            write(f"https://docs.example.org/{page.relative_to(args.html)}", page.read_bytes())
        for i, page in enumerate(rng.sample(pages, min(args.near_copies, len(pages)))):
            words = page.read_text(errors="replace").split(" ")
            for _ in range(max(len(words) // 200, 1)):  # about 0.5% of the words change
                words[rng.randrange(len(words))] = "changed"
            write(f"https://mirror{i}.example.net/{page.name}", " ".join(words).encode())
    print(f"wrote {args.out}: {len(pages)} pages + {min(args.near_copies, len(pages))} near copies")


if __name__ == "__main__":
    main()
