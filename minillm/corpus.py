"""Where documents come from: the embedded default corpus, text files, JSONL files.

A *document* is one string; the data layer (`minillm.data`) tokenizes documents and separates them
with `<|endoftext|>` in token shards.

The default corpus needs no download and no data file copied into this repository: it is the prose
every Python installation carries, the docstrings of the standard library (about 1.6 MB of English
in CPython 3.11). Sources are read with `ast`, never imported, so no module runs.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError

DEFAULT = "default"  # the name that selects the embedded corpus wherever a data path is expected
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text"}
JSONL_SUFFIXES = {".jsonl", ".jsonl.gz", ".json.gz", ".ndjson"}
# Standard-library folders that hold tests, vendored third-party code or tools, not library prose.
_SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo", "__pycache__",
              "ensurepip", "pydoc_data"}


def stdlib_docstrings(max_files: int | None = None) -> Iterator[str]:
    """Yield the docstrings of the standard library's modules, classes and functions, in a fixed
    order (sorted file paths, then source order). `max_files` limits the number of files read
    (tiny runs and tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    if not files:
        raise FileNotFoundError(f"no standard-library sources under {root}: the default corpus "
                                "needs them; pass --data with your own text instead")
    for path in files[:max_files]:
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            continue  # e.g. a file written for another Python version
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:  # one-liners like "Return x." add little prose
                    yield doc


def _suffix(path: Path) -> str:
    return "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix


def read_jsonl(path: str | Path, text_field: str = "text") -> Iterator[dict]:
    """Yield the records of a JSONL file (optionally gzipped). A malformed line or a record without
    a string `text_field` raises ValueError naming the file and line number."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UserError(f"{path}:{lineno}: expected an object with a string field "
                                 f"{text_field!r}, got {line.strip()[:80]!r}")
            yield record


def list_files(paths: list[str | Path]) -> list[Path]:
    """Expand folders (recursively, sorted) into the text and JSONL files they hold."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file()
                           and _suffix(f) in TEXT_SUFFIXES | JSONL_SUFFIXES)
            if not found:
                raise UserError(f"{p}: folder holds no text or JSONL files "
                                        f"({', '.join(sorted(TEXT_SUFFIXES | JSONL_SUFFIXES))})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"data path not found: {p}")
    return files


def read_documents(paths: list[str | Path], text_field: str = "text") -> Iterator[str]:
    """Yield documents from `paths`: `default` is the embedded corpus; a JSONL file gives one document
    per line (its `text_field`); any other file is one document (UTF-8); folders are expanded."""
    if [str(p) for p in paths] == [DEFAULT]:
        yield from stdlib_docstrings()
        return
    for path in list_files(paths):
        if _suffix(path) in JSONL_SUFFIXES:
            for record in read_jsonl(path, text_field):
                yield record[text_field]
        else:
            try:
                yield path.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text (byte {e.start}); convert it or pass "
                                 "JSONL") from None
