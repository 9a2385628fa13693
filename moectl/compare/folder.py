"""The folder `moectl compare --out` writes: compare.md (the table and the notes), curves.png (the
validation curves, with matplotlib) and compare.json (every number, docs/compare.md), last."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moectl.compare import plots
from moectl.compare.comparison import FORMAT, Comparison, to_markdown
from moectl.errors import MoectlError
from moectl.fsutil import atomic_write_text, write_json
from moectl.rundir import CURVES

COMPARE_JSON, COMPARE_MD = "compare.json", "compare.md"


def foreign_files(out: Path) -> list[str]:
    """What in an --out folder an earlier `moectl compare` did not write: [] for a new or empty
    folder or one holding a compare.json of moectl's; otherwise its entries, left alone."""
    out = Path(out)
    if not out.is_dir():
        return [] if not out.exists() else [out.name]
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return []
    try:
        doc = json.loads((out / COMPARE_JSON).read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("format") == FORMAT:
            return []
    except (OSError, ValueError, RecursionError):
        pass
    return entries


def write_comparison(result: Comparison, out: Path, log: Callable[[str], Any]) -> str | None:
    """Write the folder; returns the curves file name, or None without matplotlib (then an old
    curves.png is removed: a folder never shows the curves of another comparison)."""
    curves = CURVES if plots.plots_available() else None
    foreign = foreign_files(out)
    if foreign:
        raise MoectlError(f"--out {out} holds files moectl compare did not write ({', '.join(foreign[:3])}"
                          f"{' ...' if len(foreign) > 3 else ''}), which the comparison could replace",
                          hint="give --out a new or empty folder, or one an earlier comparison wrote")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if curves:
            groups = {g.label: [(f"seed {r.seed}", r.path) for r in g.runs] for g in result.groups}
            plots.compare_curves(groups, out / curves)
        else:
            (out / CURVES).unlink(missing_ok=True)
            log(f"{CURVES} not written: plots need matplotlib ({plots.PLOT_HINT})")
        atomic_write_text(out / COMPARE_MD, to_markdown(result))
        write_json(out / COMPARE_JSON, result.to_dict(curves))
    except OSError as e:
        raise MoectlError(f"cannot write into --out {out} ({e.strerror or e})", hint="give another folder") from None
    log(f"wrote {', '.join([COMPARE_JSON, COMPARE_MD, *([curves] if curves else [])])} to {out}")
    return curves
