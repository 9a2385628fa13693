"""Document sources: every supported format, and clear errors for bad input."""

from __future__ import annotations

import gzip
import json

import pytest

from moectl.data.sources import DataError, FilesCorpus, StdlibCorpus, open_source
from moectl.recipe.schema import FilesSource, HFSource, StdlibSource


def _docs(paths, field="text"):
    return [d.text for d in FilesCorpus(FilesSource(paths=[str(p) for p in paths], text_field=field))]


def test_txt_json_jsonl_gz(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.jsonl").write_text('{"text": "beta"}\n\n{"text": "gamma", "x": 1}\n')
    (tmp_path / "c.json").write_text(json.dumps([{"text": "delta"}, {"text": "eps"}]))
    (tmp_path / "d.json").write_text('{"body": "zeta"}\n')   # a .json file may hold JSON lines
    with gzip.open(tmp_path / "e.jsonl.gz", "wt") as f:
        f.write('{"text": "eta"}\n')
    with gzip.open(tmp_path / "f.txt.gz", "wt") as f:
        f.write("theta")
    assert _docs([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.json"]) == \
        ["alpha", "beta", "gamma", "delta", "eps"]
    assert _docs([tmp_path / "d.json"], field="body") == ["zeta"]
    assert _docs([tmp_path / "*.gz"]) == ["eta", "theta"]


def test_json_document_forms_and_bom(tmp_path):
    """A .json file may be one pretty-printed object; a UTF-8 byte-order mark is not text."""
    (tmp_path / "one.json").write_text(json.dumps({"text": "one object", "meta": {"a": 1}}, indent=2))
    assert _docs([tmp_path / "one.json"]) == ["one object"]
    (tmp_path / "bom.txt").write_bytes("\ufeffhello".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "hi"}\n'.encode())
    assert _docs([tmp_path / "bom.txt", tmp_path / "bom.jsonl"]) == ["hello", "hi"]
    (tmp_path / "broken.json").write_text('{\n  "text": "a",\n  "b": oops\n}\n')
    with pytest.raises(DataError, match=r"broken\.json:3: not valid JSON"):
        _docs([tmp_path / "broken.json"])
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": b}\n')
    with pytest.raises(DataError, match=r"lines\.json:2: not valid JSON"):
        _docs([tmp_path / "lines.json"])


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["one", "two"], "n": [1, 2]}), tmp_path / "x.parquet")
    assert _docs([tmp_path / "x.parquet"]) == ["one", "two"]
    with pytest.raises(DataError, match="no 'body' column"):
        _docs([tmp_path / "x.parquet"], field="body")


def test_globs_are_sorted_and_recursive(tmp_path):
    for name in ("b/2.txt", "a/1.txt", "b/c/3.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    assert _docs([f"{tmp_path}/**/*.txt"]) == ["a/1.txt", "b/2.txt", "b/c/3.txt"]


@pytest.mark.parametrize("content, field, message", [
    ('{"text": "ok"}\n{"text": broken}\n', "text", r"bad\.jsonl:2: not valid JSON"),
    ('{"text": "ok"}\n{"body": "x"}\n', "text", r"bad\.jsonl:2: no 'text' field \(keys: 'body'\)"),
    ('{"text": 3}\n', "text", r"bad\.jsonl:1: field 'text' is a int"),
    ('[1, 2]\n', "text", r"bad\.jsonl:1: expected a JSON object"),
])
def test_bad_jsonl(tmp_path, content, field, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        _docs([tmp_path / "bad.jsonl"], field)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(DataError, match=r"data.source.paths\[0\]: no file matches"):
        _docs([tmp_path / "nope*.txt"])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="unsupported file type"):
        _docs([tmp_path / "x.csv"])
    with pytest.raises(DataError, match="is a folder"):
        _docs([tmp_path])


def test_not_utf8(tmp_path):
    (tmp_path / "x.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        _docs([tmp_path / "x.txt"])


def test_fingerprint_tracks_changes(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one")
    src = FilesSource(paths=[str(p)])
    before = FilesCorpus(src).fingerprint()
    assert FilesCorpus(src).fingerprint() == before
    p.write_text("two words")
    assert FilesCorpus(src).fingerprint() != before


def test_stdlib_corpus_is_real_and_stable():
    corpus = StdlibCorpus(StdlibSource())
    assert len(corpus.files) > 500
    first = next(iter(corpus))
    assert first.text and first.origin.endswith(".py")
    assert corpus.fingerprint() == StdlibCorpus(StdlibSource()).fingerprint()
    assert len(StdlibCorpus(StdlibSource(include_tests=False)).files) < len(corpus.files)


def test_hf_source_offline_with_local_files(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "d.jsonl").write_text('{"content": "from hf"}\n{"content": "second"}\n')
    src = open_source(HFSource(name="json", data_files=[str(tmp_path / "d.jsonl")], text_field="content"))
    assert [d.text for d in src] == ["from hf", "second"]
    assert src.size_hint() == 2
    with pytest.raises(DataError, match="no column 'text'"):
        open_source(HFSource(name="json", data_files=[str(tmp_path / "d.jsonl")]))
