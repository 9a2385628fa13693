"""Tokenizer training and token shards: cached by content, split by document, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moectl.data.prepare import EOT, is_val, prepare_data, split_documents
from moectl.data.sources import DataError, Document
from moectl.recipe.load import load_recipe
from tests.conftest import train_recipe_text


@pytest.fixture
def recipe(corpus, tmp_path, write):
    path = write("r.yaml", train_recipe_text(corpus))
    return lambda *ov: load_recipe(path, [f"data.cache_dir={tmp_path / 'cache'}", *ov])


def test_split_is_deterministic_and_by_document():
    docs = [Document(str(i), str(i)) for i in range(200)]
    a = list(split_documents(iter(docs), seed=3, fraction=0.1, max_documents=None))
    b = list(split_documents(iter(docs), seed=3, fraction=0.1, max_documents=None))
    assert a == b
    val = [d.text for s, d in a if s == "val"]
    assert 5 < len(val) < 40
    assert val != [d.text for s, d in split_documents(iter(docs), 4, 0.1, None) if s == "val"]
    assert sorted(d.text for _, d in a) == sorted(str(i) for i in range(200))
    assert is_val(3, 0, 1.0) and not is_val(3, 0, 0.0)


def test_split_always_has_a_validation_document():
    docs = [Document("x", "x"), Document("y", "y")]
    splits = [s for s, _ in split_documents(iter(docs), 0, 1e-9, None)]
    assert splits == ["train", "val"]


def test_prepare_shards_and_cache(recipe):
    r = recipe()
    data = prepare_data(r, show_progress=False, log=lambda *a: None)
    idx = data.index
    assert idx["dtype"] == "uint16" and idx["vocab_size"] <= 512
    train, val = data.tokens("train"), data.tokens("val")
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)   # read from disk, not loaded
    assert len(train) == idx["splits"]["train"]["tokens"] > 10_000
    assert (train == data.eot_id).sum() == idx["splits"]["train"]["documents"]
    assert train[-1] == data.eot_id and val[-1] == data.eot_id
    assert 0 < idx["val_unigram_entropy"] < np.log(512)
    # The tokenizer round-trips the text and marks documents with the end-of-text token.
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(data.tokenizer_path))
    assert tok.token_to_id(EOT) == data.eot_id
    first_doc = train[: int(np.argmax(train == data.eot_id))]
    assert "import" in tok.decode(first_doc.tolist())
    # A second run reuses both cache entries without re-reading.
    mtime = (data.dir / "train.bin").stat().st_mtime_ns
    tok_mtime = data.tokenizer_path.stat().st_mtime_ns
    logged = []
    again = prepare_data(r, show_progress=False, log=logged.append)
    assert again.dir == data.dir and (again.dir / "train.bin").stat().st_mtime_ns == mtime
    assert again.tokenizer_path == data.tokenizer_path and data.tokenizer_path.stat().st_mtime_ns == tok_mtime
    assert logged == []   # neither trained nor tokenised again
    # A different split gives a different entry.
    other = prepare_data(recipe("data.val_fraction=0.3"), show_progress=False, log=lambda *a: None)
    assert other.dir != data.dir


def test_file_tokenizer(recipe, tmp_path):
    data = prepare_data(recipe(), show_progress=False, log=lambda *a: None)
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(Path(data.tokenizer_path).read_text())
    loaded = prepare_data(recipe(f"data.tokenizer.path={folder}"), show_progress=False, log=lambda *a: None)
    assert loaded.eot_id == data.eot_id
    np.testing.assert_array_equal(loaded.tokens("train"), data.tokens("train"))
    with pytest.raises(DataError, match="model.vocab_size is 100"):
        prepare_data(recipe(f"data.tokenizer.path={folder}", "model.vocab_size=100"), show_progress=False,
                     log=lambda *a: None)
    with pytest.raises(DataError, match="no end-of-text token"):
        prepare_data(recipe(f"data.tokenizer.path={folder}", "data.tokenizer.eot_token='<nope>'"),
                     show_progress=False, log=lambda *a: None)
    with pytest.raises(DataError, match="no tokenizer at"):
        prepare_data(recipe(f"data.tokenizer.path={tmp_path / 'missing'}"), show_progress=False, log=lambda *a: None)


def test_bad_input_leaves_nothing_behind(recipe, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n' * 50 + "not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:51: not valid JSON"):
        prepare_data(recipe(f"data.source.paths=['{bad}']", "data.tokenizer.train_bytes=10"),
                     show_progress=False, log=lambda *a: None)
    cache = tmp_path / "cache"
    leftovers = [p for p in cache.rglob("*") if p.is_dir() and p.name.startswith(".")]
    assert leftovers == []
    assert not (cache / "tokens").exists() or not any((cache / "tokens").iterdir())


def test_empty_corpus(recipe, tmp_path):
    """Nothing to train on: a message that says why and names the files; nothing is cached."""
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match=r"the corpus is empty: 1 local file\(s\) \(.*empty\.txt\)"):
        prepare_data(recipe(f"data.source.paths=['{empty}']"), show_progress=False, log=lambda *a: None)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"the corpus is empty: .*blank\.jsonl\) gave no documents"):
        prepare_data(recipe(f"data.source.paths=['{tmp_path}/blank.jsonl']"), show_progress=False, log=lambda *a: None)
    single = tmp_path / "single.txt"
    single.write_text("x")    # one document too short to split: all of it would be validation
    with pytest.raises(DataError, match="all held out for validation"):
        prepare_data(recipe(f"data.source.paths=['{single}']"), show_progress=False, log=lambda *a: None)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.json"))


def test_a_single_document_is_split_at_a_line(recipe, tmp_path):
    """nanoGPT's input.txt: one file, so its last val_fraction (from a line start) is validation."""
    from moectl.data.prepare import split_documents, split_single
    from moectl.data.sources import Document

    text = "".join(f"line {i}: {'abc ' * (i % 7)}\n" for i in range(200))
    parts = split_single(Document(text, "input.txt"), 0.1)
    assert [s for s, _ in parts] == ["train", "val"]
    train, val = parts[0][1].text, parts[1][1].text
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert abs(len(val) / len(text) - 0.1) < 0.02
    assert list(split_documents(iter([Document(text, "input.txt")]), 0, 0.1, None)) == parts
    path = tmp_path / "input.txt"
    path.write_text(text * 20)
    data = prepare_data(recipe(f"data.source.paths=['{path}']", "data.val_fraction=0.1"), show_progress=False,
                        log=lambda *a: None)
    counts = data.index["splits"]
    assert counts["train"]["documents"] == 1 and counts["val"]["documents"] == 1
    assert 0.05 < counts["val"]["tokens"] / (counts["train"]["tokens"] + counts["val"]["tokens"]) < 0.15


def test_large_vocabulary_uses_uint32(recipe, tmp_path):
    """Ids above 65,535 do not fit uint16: such a tokenizer's shards are uint32 and keep every id."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(70_000)]
    vocab = {EOT: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    for i in range(4):
        (tmp_path / f"d{i}.txt").write_text(" ".join(words[i * 17_000:(i + 1) * 17_000 + 500]))
    data = prepare_data(recipe(f"data.source.paths=['{tmp_path}/d*.txt']", f"data.tokenizer.path={tmp_path}",
                               "model.vocab_size=70002", "data.val_fraction=0.3"),
                        show_progress=False, log=lambda *a: None)
    assert data.index["dtype"] == "uint32"
    ids = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert ids.max() > 65_535 and set(ids.tolist()) - {0} <= set(range(2, 70_002))


def test_index_file_is_written_last(recipe):
    data = prepare_data(recipe(), show_progress=False, log=lambda *a: None)
    assert json.loads((data.dir / "index.json").read_text())["format"] == 2


def test_data_prepare_command(cli, corpus, write, tmp_path):
    path = write("r.yaml", train_recipe_text(corpus))
    result = cli("data", "prepare", path, f"data.cache_dir={tmp_path / 'c'}", "-q")
    assert result.exit_code == 0, result.output
    for word in ("train", "val", "documents", "unigram entropy", "shards"):
        assert word in result.output
    bad = cli("data", "prepare", path, "data.source.paths=['/nonexistent/*.txt']", "-q")
    assert bad.exit_code == 2 and "no file matches" in bad.stderr
