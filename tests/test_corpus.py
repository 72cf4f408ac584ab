import gzip
import json

import pytest

from minillm.corpus import read_documents, read_jsonl, stdlib_docstrings


def test_default_corpus_is_english_prose_in_fixed_order():
    docs = list(stdlib_docstrings(max_files=20))
    assert len(docs) > 20 and docs == list(stdlib_docstrings(max_files=20))
    text = " ".join(docs)
    words = text.split()
    assert sum(w.lower() in {"the", "a", "of", "to", "is"} for w in words) / len(words) > 0.05


def test_default_corpus_through_read_documents():
    docs = read_documents(["default"])
    first = [next(docs) for _ in range(3)]
    assert first == list(stdlib_docstrings(max_files=5))[:3]


def test_text_jsonl_and_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("file a")
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "one", "id": 1}\n\n{"text": "two"}\n')
    with gzip.open(tmp_path / "sub" / "c.jsonl.gz", "wt") as f:
        f.write(json.dumps({"content": "three"}) + "\n")
    (tmp_path / "sub" / "ignored.bin").write_bytes(b"\0")
    assert list(read_documents([tmp_path / "sub" / "a.txt", tmp_path / "sub" / "b.jsonl"])) == [
        "file a", "one", "two"]
    assert list(read_jsonl(tmp_path / "sub" / "c.jsonl.gz", "content")) == [{"content": "three"}]
    with pytest.raises(ValueError, match="c.jsonl.gz:1: expected an object with a string field 'text'"):
        list(read_documents([tmp_path / "sub"]))


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON line"):
        list(read_documents([bad]))
    with pytest.raises(ValueError, match="data path not found: .*missing.txt"):
        list(read_documents([tmp_path / "missing.txt"]))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin.txt: not UTF-8"):
        list(read_documents([latin]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: folder holds no text or JSONL files"):
        list(read_documents([tmp_path / "empty"]))
