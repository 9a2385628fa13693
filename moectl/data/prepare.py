"""Tokenise a corpus once into memory-mapped token shards, cached by content.

    source --split by document (seed)--> tokenizer (trained BPE or a file) --> train.bin, val.bin

Each split is one flat array of token ids (uint16 when the vocabulary fits, else uint32) with an
end-of-text token after every document, plus index.json. Cache keys hash the source's fingerprint,
the split settings and the tokenizer, so a changed input gives a new cache entry and an unchanged
one is reused without reading the corpus. Everything is written to a temporary folder and renamed
into place, so the cache never holds half a result.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moectl.data.sources import DataError, Document, content_hash, open_source
from moectl.data.tokenizer import EOT, eot_id_of, load_tokenizer, train_bpe
from moectl.fsutil import atomic_dir
from moectl.progress import JobProgress
from moectl.recipe.schema import BPETokenizer, DataConfig, Recipe
from moectl.rundir import TOKENIZER

FORMAT_VERSION = 2   # 2: a corpus of one document is split inside it


def cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MOECTL_CACHE") or Path.home() / ".cache" / "moectl"
    return Path(root).expanduser()


def is_val(seed: int, index: int, fraction: float) -> bool:
    """Whether document `index` is held out: a hash of (seed, index), so the split is stable."""
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


def split_single(doc: Document, fraction: float) -> list[tuple[str, Document]]:
    """A corpus of one document (nanoGPT's input.txt): its last `fraction` of characters, from the
    start of a line, is the validation split, the rest training."""
    text = doc.text
    cut = round(len(text) * (1 - fraction))
    line = text.rfind("\n", 0, cut)
    if line >= 0 and cut - (line + 1) <= max(1, 0.1 * (len(text) - cut)):   # a line start close by
        cut = line + 1
    if cut <= 0 or cut >= len(text):
        return [("val", doc)]
    return [("train", Document(text[:cut], doc.origin)), ("val", Document(text[cut:], f"{doc.origin} (end)"))]


def split_documents(docs: Iterator[Document], seed: int, fraction: float,
                    max_documents: int | None) -> Iterator[tuple[str, Document]]:
    """("train" | "val", doc) pairs, by document from a hash of the seed. If no document was drawn
    for validation, the last one is; a corpus of a single document is split inside it
    (`split_single`)."""
    docs = iter(docs)
    first = next(docs, None)
    if first is None:
        return
    second = next(docs, None) if max_documents is None or max_documents > 1 else None
    if second is None:
        yield from split_single(first, fraction)
        return
    yield from _split_by_document(itertools.chain([first, second], docs), seed, fraction, max_documents)


def _split_by_document(docs: Iterator[Document], seed: int, fraction: float,
                       max_documents: int | None) -> Iterator[tuple[str, Document]]:
    held: Document | None = None
    any_val = False
    for i, doc in enumerate(docs):
        if max_documents is not None and i >= max_documents:
            break
        if held is not None:
            yield "train", held
            held = None
        if is_val(seed, i, fraction):
            any_val = True
            yield "val", doc
        else:
            held = doc
    if held is not None:
        yield ("train" if any_val else "val"), held


@dataclass(frozen=True)
class SplitCounts:
    documents: int
    tokens: int      # end-of-text tokens included


@dataclass(frozen=True)
class PreparedData:
    """Where a recipe's prepared data is, and what its index.json says about it."""

    dir: Path
    tokenizer_path: Path
    source: str                  # the source, described
    dtype: str                   # of the token ids: uint16 or uint32
    vocab_size: int              # of the tokenizer
    eot_id: int
    splits: dict[str, SplitCounts]
    val_unigram_entropy: float   # nats: the loss of a model that knows only token frequencies
    index: dict[str, Any]        # index.json as written (a run's data.json copies it)

    @classmethod
    def read(cls, shard_dir: Path, tokenizer_path: Path) -> PreparedData:
        index = json.loads((shard_dir / "index.json").read_text())
        splits = {name: SplitCounts(int(c["documents"]), int(c["tokens"])) for name, c in index["splits"].items()}
        return cls(shard_dir, tokenizer_path, index["source"], index["dtype"], index["vocab_size"], index["eot_id"],
                   splits, index["val_unigram_entropy"], index)

    def tokens(self, split: str) -> np.ndarray:
        n = self.splits[split].tokens
        if n == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.dir / f"{split}.bin", dtype=self.dtype, mode="r", shape=(n,))


# --------------------------------------------------------------------------- the pipeline


def _check_training_text(source, counts: dict[str, dict[str, int]], for_training: bool = True) -> None:
    """Refuse a corpus that leaves nothing to train on (with `for_training`; else only one with no
    text at all), saying why. `counts` per split: documents, and tokens including one end-of-text
    per document."""
    train, val = counts["train"], counts["val"]
    total = train["documents"] + val["documents"]
    if total == 0:
        raise DataError(f"the corpus is empty: {source.describe()} gave no documents",
                        hint="point data.source at files that contain text")
    if train["tokens"] + val["tokens"] <= total:
        raise DataError(f"the corpus is empty: {source.describe()} gave {total} document(s), all without text",
                        hint="point data.source at files that contain text")
    if not for_training:
        return
    if train["documents"] == 0:
        raise DataError(f"{source.describe()} gave {total} document(s), all held out for validation: "
                        "the training split is empty",
                        hint="add documents (validation takes at least one), or lower data.val_fraction")
    if train["tokens"] <= train["documents"]:
        raise DataError(f"no training text: {source.describe()} gave {total} document(s), and those of the "
                        "training split are all empty",
                        hint="point data.source at files that contain text")


@dataclass
class _Job:
    """What every stage of preparing one recipe's data needs."""

    recipe: Recipe
    source: Any
    split_seed: int
    split_key: dict[str, Any]
    fingerprint: str
    root: Path
    for_training: bool = True

    @property
    def cfg(self) -> DataConfig:
        return self.recipe.data

    @property
    def vocab_limit(self) -> int:
        return self.recipe.model.vocab_size

    def documents(self) -> Iterator[tuple[str, Document]]:
        return split_documents(iter(self.source), self.split_seed, self.cfg.val_fraction, self.cfg.max_documents)


def prepare_data(recipe: Recipe, show_progress: bool = True, log=print, for_training: bool = True) -> PreparedData:
    """Make sure the recipe's token shards exist; build them if not. Returns where they are.
    `for_training=False` (evaluation) accepts a corpus whose training split is empty."""
    cfg = recipe.data
    source = open_source(cfg.source)
    split_seed = recipe.seed if cfg.split_seed is None else cfg.split_seed
    split_key = {"seed": split_seed, "val_fraction": cfg.val_fraction, "max_documents": cfg.max_documents}
    job = _Job(recipe, source, split_seed, split_key, source.fingerprint(), cache_root(cfg), for_training)
    tok, tok_path, eot_id = _tokenizer(job, log)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    if vocab > job.vocab_limit:
        raise DataError(f"the tokenizer has {vocab} tokens but model.vocab_size is {job.vocab_limit}",
                        hint=f"set model.vocab_size to at least {vocab}")
    tok_sha = hashlib.blake2b(tok_path.read_bytes(), digest_size=16).hexdigest()
    special = getattr(cfg.tokenizer, "add_special_tokens", False)
    shard_key = content_hash("shards", job.fingerprint, split_key, tok_sha, eot_id, FORMAT_VERSION,
                             *(["template"] if special else []))
    shard_dir = job.root / "tokens" / shard_key
    if not (shard_dir / "index.json").is_file():
        log(f"tokenising {source.describe()} into {shard_dir}")
        try:
            with atomic_dir(shard_dir) as tmp:
                _write_shards(job, tmp, tok, tok_path, tok_sha, eot_id, show_progress)
        except OSError:
            if not (shard_dir / "index.json").is_file():  # someone else may have published it first
                raise
    return PreparedData.read(shard_dir, tok_path)


def _tokenizer(job: _Job, log) -> tuple[Any, Path, int]:
    """The recipe's tokenizer: a BPE trained on the training split (cached), or a file."""
    cfg = job.cfg
    if not isinstance(cfg.tokenizer, BPETokenizer):
        tok, tok_path = load_tokenizer(cfg.tokenizer.path)
        return tok, tok_path, eot_id_of(tok, cfg.tokenizer.eot_token)
    tok_key = content_hash("bpe", job.fingerprint, job.split_key, job.vocab_limit, cfg.tokenizer.train_bytes,
                           FORMAT_VERSION)
    tok_dir = job.root / "tokenizers" / tok_key
    if not (tok_dir / TOKENIZER).is_file():
        log(f"training a {job.vocab_limit}-token byte-level BPE on {job.source.describe()}")
        seen = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}

        def train_docs() -> Iterator[str]:
            for split, d in job.documents():
                seen[split]["documents"] += 1
                seen[split]["tokens"] += len(d.text) + 1   # characters + end-of-text, for the check
                if split == "train":
                    yield d.text

        tok = train_bpe(train_docs(), job.vocab_limit, cfg.tokenizer.train_bytes)
        _check_training_text(job.source, seen)   # before anything is cached
        try:
            with atomic_dir(tok_dir) as tmp:
                tok.save(str(tmp / TOKENIZER))
        except OSError:
            if not (tok_dir / TOKENIZER).is_file():
                raise
    tok, tok_path = load_tokenizer(tok_dir)
    return tok, tok_path, eot_id_of(tok, EOT)


def _write_shards(job: _Job, out: Path, tok, tok_path: Path, tok_sha: str, eot_id: int, show_progress: bool) -> None:
    """Tokenise every document into out/{train,val}.bin and write out/index.json."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32   # ids 0 .. vocab-1
    special = getattr(job.cfg.tokenizer, "add_special_tokens", False)   # the tokenizer's template (a BOS)
    counts = {"train": {"documents": 0, "tokens": 0}, "val": {"documents": 0, "tokens": 0}}
    val_freq = np.zeros(job.vocab_limit, dtype=np.int64)
    total_docs = job.source.size_hint()
    if total_docs is not None and job.cfg.max_documents is not None:
        total_docs = min(total_docs, job.cfg.max_documents)
    with (JobProgress(show_progress) as bar, open(out / "train.bin", "wb") as f_train,
          open(out / "val.bin", "wb") as f_val):
        files = {"train": f_train, "val": f_val}
        advance = bar.task("tokenising", total_docs, unit="documents")

        def flush(batch: list[tuple[str, Document]]) -> None:
            encoded = tok.encode_batch([d.text for _, d in batch], add_special_tokens=special)
            for (split, _), enc in zip(batch, encoded, strict=True):
                # the end-of-text token after each document (once: a template may end with it already)
                ends = special and enc.ids[-1:] == [eot_id]
                ids = np.asarray(enc.ids + ([] if ends else [eot_id]), dtype=dtype)
                ids.tofile(files[split])
                counts[split]["documents"] += 1
                counts[split]["tokens"] += len(ids)
                if split == "val":
                    val_freq[:] += np.bincount(ids, minlength=job.vocab_limit)[:job.vocab_limit]
            advance(len(batch), info=f"{counts['train']['tokens'] + counts['val']['tokens']:,} tokens")

        batch: list[tuple[str, Document]] = []
        for item in job.documents():
            batch.append(item)
            if len(batch) >= 256:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    _check_training_text(job.source, counts, job.for_training)
    p = val_freq[val_freq > 0] / max(val_freq.sum(), 1)
    index = {
        "format": FORMAT_VERSION, "source": job.source.describe(), "dtype": np.dtype(dtype).name,
        "vocab_size": vocab, "eot_id": eot_id, "tokenizer": str(tok_path), "tokenizer_sha": tok_sha,
        "splits": counts, "val_unigram_entropy": float(-(p * np.log(p)).sum()) if p.size else math.nan,
        "seed": job.split_seed, "val_fraction": job.cfg.val_fraction,
    }
    (out / "index.json").write_text(json.dumps(index, indent=2))
