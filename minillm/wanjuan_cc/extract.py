"""HTML to main text (WanJuan-CC stage 2), on the standard library's HTML parser.

What is kept: the text of paragraphs, headings, list items, table cells and preformatted blocks, one
block per line, entities decoded. What is dropped: script, style, noscript, template, svg, forms,
navigation, header / footer / aside chrome, and the document head except the title. Broken markup
never raises: the parser is tolerant, and if it fails anyway the text between tags is kept.

The charset comes from the HTTP header, else from `<meta charset>` / `<meta http-equiv>`, else UTF-8
when the bytes decode as UTF-8, else Windows-1252 (what browsers assume for unlabelled Western pages).
Where `resiliparse` is installed, `extract_text(..., backend="resiliparse")` uses its fast extractor.
"""

from __future__ import annotations

import codecs
import re
from html.parser import HTMLParser

SKIP = {"script", "style", "noscript", "template", "svg", "form", "nav", "footer", "header",
        "aside", "iframe", "button", "select", "textarea", "head", "menu", "object", "canvas"}
BLOCK = {"p", "div", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "td", "th", "section",
         "article", "pre", "blockquote", "table", "ul", "ol", "dd", "dt", "dl", "main", "hr",
         "figcaption", "caption", "address", "summary", "details"}
VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source",
        "track", "wbr", "param"}
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_\-:.]+)""", re.I)
_HEADER_CHARSET = re.compile(r"charset\s*=\s*[\"']?([A-Za-z0-9_\-:.]+)", re.I)
_SPACES = re.compile(r"[ \t\r\f\v\u00a0]+")


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.current: list[str] = []
        self.skip_depth = 0
        self.in_title = False
        self.title = ""
        self.in_pre = 0

    def _break(self):
        text = "".join(self.current)
        self.current = []
        lines = text.split("\n") if self.in_pre else [text]
        for line in lines:
            line = _SPACES.sub(" ", line).strip()
            if line:
                self.lines.append(line)

    def handle_starttag(self, tag, attrs):
        if tag == "title":
            self.in_title = True
        if tag in SKIP and tag not in VOID:
            self.skip_depth += 1
        elif tag in BLOCK:
            self._break()
            if tag == "pre":
                self.in_pre += 1

    def handle_startendtag(self, tag, attrs):
        if tag in BLOCK:
            self._break()

    def handle_endtag(self, tag):
        if tag == "title":
            self.in_title = False
        if tag in SKIP and tag not in VOID:
            self.skip_depth = max(self.skip_depth - 1, 0)
        elif tag in BLOCK:
            self._break()
            if tag == "pre":
                self.in_pre = max(self.in_pre - 1, 0)

    def handle_data(self, data):
        if self.in_title and not self.title:
            self.title = _SPACES.sub(" ", data).strip()
        if self.skip_depth == 0:
            self.current.append(data if self.in_pre else data.replace("\n", " "))


def decode_html(raw: bytes, content_type: str | None = None) -> str:
    """Bytes of a page to text, with the charset chosen as the module docstring says."""
    candidates = []
    if content_type:
        m = _HEADER_CHARSET.search(content_type)
        if m:
            candidates.append(m.group(1))
    m = _META_CHARSET.search(raw[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii", "replace"))
    for name in candidates:
        try:
            codecs.lookup(name)
        except LookupError:
            continue
        return raw.decode(name, errors="replace")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def extract_text(html: str | bytes, content_type: str | None = None,
                 backend: str = "stdlib") -> tuple[str, str]:
    """(main text, title) of an HTML page."""
    if isinstance(html, bytes):
        html = decode_html(html, content_type)
    if backend == "resiliparse":
        from resiliparse.extract.html2text import extract_plain_text
        from resiliparse.parse.html import HTMLTree

        tree = HTMLTree.parse(html)
        return extract_plain_text(tree, main_content=True), (tree.title or "")
    parser = _TextParser()
    try:
        parser.feed(html)
        parser.close()
        parser._break()
        return "\n".join(parser.lines), parser.title
    except Exception:  # the parser is tolerant; this is the last resort for pathological input
        text = re.sub(r"<[^>]*>", "\n", html)
        lines = (_SPACES.sub(" ", line).strip() for line in text.split("\n"))
        return "\n".join(line for line in lines if line), ""
