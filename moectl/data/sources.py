"""Document sources: the built-in corpus, local files, Hugging Face datasets.

Each source yields `Document(text, origin)` in a deterministic order and has a cheap fingerprint
(from file names, sizes and modification times, or the dataset's own fingerprint) that keys the
caches, so an unchanged corpus is never read twice. Problems in the input are `DataError`s that
name the file and line.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import stat
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moectl.errors import MoectlError
from moectl.extras import install_hint
from moectl.recipe.schema import FilesSource, HFSource, SourceConfig, StdlibSource


class DataError(MoectlError):
    """Bad data input: exit code 2, message naming the file (and line)."""


@dataclass(frozen=True)
class Document:
    text: str
    origin: str      # "path" or "path:line" or "dataset[row]"


def content_hash(*parts: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def _stat_list(paths: list[Path]) -> list[tuple[str, int, int]]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p.resolve()), st.st_size, st.st_mtime_ns))
    return out


# --------------------------------------------------------------------------- stdlib


def stdlib_files(include_tests: bool = True) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in ("site-packages", "dist-packages") or "__pycache__" in rel:
            continue
        if not include_tests and any(part in ("test", "tests", "idle_test") for part in rel):
            continue
        files.append(p)
    return files


class StdlibCorpus:
    def __init__(self, cfg: StdlibSource):
        self.cfg = cfg
        self.files = stdlib_files(cfg.include_tests)
        if not self.files:
            raise DataError(f"no Python source files found under {sysconfig.get_paths()['stdlib']}",
                            hint="use data.source.kind=files with your own text")

    def describe(self) -> str:
        return f"Python {sys.version.split()[0]} standard library ({len(self.files)} files)"

    def size_hint(self) -> int | None:
        return len(self.files)

    def fingerprint(self) -> str:
        return content_hash("stdlib", self.cfg.model_dump(), _stat_list(self.files))

    def __iter__(self) -> Iterator[Document]:
        for p in self.files:
            yield Document(p.read_text(encoding="utf-8", errors="replace"), str(p))


# --------------------------------------------------------------------------- local files

_SUFFIXES = (".txt", ".text", ".md", ".jsonl", ".json", ".parquet")


def _expand(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for i, pattern in enumerate(patterns):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise DataError(f"data.source.paths[{i}]: no file matches {pattern!r}",
                            hint="paths are relative to the working directory; check the spelling")
        for m in matches:
            p = Path(m)
            if p.is_dir():
                raise DataError(f"data.source.paths[{i}]: {m} is a folder",
                                hint=f"use a glob such as '{m.rstrip('/')}/**/*.txt'")
            try:
                regular = stat.S_ISREG(p.stat().st_mode)
            except OSError as e:   # a broken link, a link loop, no permission
                raise DataError(f"data.source.paths[{i}]: {m} cannot be read ({e.strerror})",
                                hint="fix or remove the file (a link must point at a file)") from None
            if not regular:
                raise DataError(f"data.source.paths[{i}]: {m} is not a regular file (a pipe, socket or device)",
                                hint="point data.source.paths at text files") from None
            if _kind_of(p) is None:
                raise DataError(f"data.source.paths[{i}]: {m}: unsupported file type",
                                hint=f"supported: {', '.join(_SUFFIXES)} (optionally .gz)")
            if p not in files:
                files.append(p)
    return files


def _regular(p: Path) -> bool:
    try:
        return stat.S_ISREG(p.stat().st_mode)
    except OSError:
        return False


def files_in(folder: Path) -> list[Path]:
    """Every file of a supported type under `folder` (recursively), sorted."""
    return sorted(p for p in Path(folder).rglob("*") if _regular(p) and _kind_of(p) is not None)


def _kind_of(p: Path) -> str | None:
    name = p.name.lower().removesuffix(".gz")
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return {".text": "txt", ".md": "txt"}.get(suffix, suffix[1:])
    return None


def _open_text(p: Path) -> io.TextIOBase:
    raw = gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb")
    return io.TextIOWrapper(raw, encoding="utf-8-sig", errors="strict")   # -sig: a leading BOM is not text


def _parses(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with a {field!r} field, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise DataError(f"{where}: no {field!r} field (keys: {keys})",
                        hint="set data.source.text_field to the field that holds the text")
    text = record[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is a {type(text).__name__}, not text")
    return text


class FilesCorpus:
    def __init__(self, cfg: FilesSource):
        self.cfg = cfg
        self.files = _expand(cfg.paths)

    def describe(self) -> str:
        patterns = list(self.cfg.paths)
        shown = ", ".join(patterns[:3]) + (f" and {len(patterns) - 3} more" if len(patterns) > 3 else "")
        return f"{len(self.files)} local file(s) ({shown})"

    def size_hint(self) -> int | None:
        """Documents, when every file is one document."""
        return len(self.files) if all(_kind_of(p) == "txt" for p in self.files) else None

    def fingerprint(self) -> str:
        return content_hash("files", self.cfg.text_field, _stat_list(self.files))

    def __iter__(self) -> Iterator[Document]:
        for p in self.files:
            kind = _kind_of(p)
            try:
                if kind == "txt":
                    with _open_text(p) as f:
                        yield Document(f.read(), str(p))
                elif kind == "parquet":
                    yield from self._parquet(p)
                else:
                    yield from self._json(p, kind)
            except UnicodeDecodeError as e:
                raise DataError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except (OSError, EOFError) as e:
                raise DataError(f"{p}: cannot read: {e}") from None

    def _json(self, p: Path, kind: str) -> Iterator[Document]:
        """.jsonl: one object per line, streamed. .json: one array of objects, one object, or (as
        many .json files are) JSON lines."""
        field = self.cfg.text_field
        with _open_text(p) as f:
            if kind == "jsonl":
                yield from self._json_lines(p, f)
                return
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
            first_line_ok = _parses(text.lstrip().split("\n", 1)[0])
            if not first_line_ok:    # neither one JSON document nor JSON lines: report the document's error
                raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})",
                                hint="a .json file holds one array of objects, one object, or one object per line"
                                ) from None
            yield from self._json_lines(p, io.StringIO(text))
            return
        records = data if isinstance(data, list) else [data]
        for i, rec in enumerate(records):
            where = f"{p}[{i}]" if isinstance(data, list) else str(p)
            yield Document(_record_text(rec, field, where), where)

    def _json_lines(self, p: Path, lines: Iterator[str]) -> Iterator[Document]:
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg})",
                                hint="each line of a .jsonl file must be one JSON object") from None
            yield Document(_record_text(rec, self.cfg.text_field, f"{p}:{lineno}"), f"{p}:{lineno}")

    def _parquet(self, p: Path) -> Iterator[Document]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{p}: reading parquet needs pyarrow",
                            hint=install_hint("data")) from None
        try:
            pf = pq.ParquetFile(gzip.open(p) if p.name.endswith(".gz") else p)
        except Exception as e:  # pyarrow raises several types for corrupt files
            raise DataError(f"{p}: not a readable parquet file ({e})") from None
        field = self.cfg.text_field
        if field not in pf.schema_arrow.names:
            raise DataError(f"{p}: no {field!r} column (columns: {', '.join(pf.schema_arrow.names)})",
                            hint="set data.source.text_field to the column that holds the text")
        row = 0
        for batch in pf.iter_batches(columns=[field]):
            for text in batch.column(0).to_pylist():
                if not isinstance(text, str):
                    raise DataError(f"{p}: row {row}: {field!r} is {type(text).__name__}, not text")
                yield Document(text, f"{p}[row {row}]")
                row += 1


# --------------------------------------------------------------------------- Hugging Face datasets


class HFCorpus:
    def __init__(self, cfg: HFSource):
        self.cfg = cfg
        try:
            import datasets
        except ImportError:
            raise DataError("data.source.kind 'hf' needs the `datasets` package",
                            hint=install_hint("data")) from None
        try:
            self.ds = datasets.load_dataset(cfg.name, cfg.config, split=cfg.split, data_files=cfg.data_files,
                                            revision=cfg.revision)
        except FileNotFoundError as e:
            raise DataError(f"data.source: dataset {cfg.name!r} not found: {e}") from None
        except Exception as e:  # datasets raises many types for unreachable hubs and bad files
            raise DataError(f"data.source: cannot load dataset {cfg.name!r}: {e}") from None
        if cfg.text_field not in self.ds.column_names:
            raise DataError(f"data.source: dataset {cfg.name!r} has no column {cfg.text_field!r} "
                            f"(columns: {', '.join(self.ds.column_names)})",
                            hint="set data.source.text_field")

    def describe(self) -> str:
        return f"dataset {self.cfg.name} ({self.cfg.split}, {len(self.ds)} rows)"

    def size_hint(self) -> int | None:
        return len(self.ds)

    def fingerprint(self) -> str:
        return content_hash("hf", self.cfg.model_dump(), self.ds._fingerprint)

    def __iter__(self) -> Iterator[Document]:
        field, i = self.cfg.text_field, 0
        for batch in self.ds.select_columns([field]).iter(batch_size=1024):
            for text in batch[field]:
                if not isinstance(text, str):
                    raise DataError(f"dataset {self.cfg.name}[{i}]: {field!r} is {type(text).__name__}, not text")
                yield Document(text, f"{self.cfg.name}[{i}]")
                i += 1


def open_source(cfg: SourceConfig):
    if isinstance(cfg, StdlibSource):
        return StdlibCorpus(cfg)
    if isinstance(cfg, FilesSource):
        return FilesCorpus(cfg)
    return HFCorpus(cfg)
