"""`moectl compare`: final metrics of finished runs side by side, grouped by recipe, with mean, sample
standard deviation and differences paired by seed against a baseline group (docs/compare.md)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

import typer

from moectl.cli.common import handle_errors, stderr_console, stdout_console


class GroupBy(str, Enum):
    recipe = "recipe"
    run = "run"


@handle_errors
def compare(
    runs: list[Path] = typer.Argument(None, help="Finished run folders written by `moectl train` (each with "
                                      "logs/summary.json).", metavar="RUN", show_default=False),
    group_by: GroupBy = typer.Option(GroupBy.recipe, "--group-by", case_sensitive=False,
                                     help="'recipe': runs whose resolved recipes differ only in seed, name or "
                                     "run folder form one group, summarised over its seeds; 'run': every run "
                                     "is its own group."),
    baseline: str = typer.Option(None, "--baseline", help="The group the others are compared with: its label "
                                 "as the table shows it, or one of its run folders (default: the group of the "
                                 "first run given)."),
    out: Path = typer.Option(None, "--out", help="Write compare.json, compare.md and curves.png (validation "
                             "curves; needs matplotlib) into this folder, made if missing. Without --out "
                             "nothing is written."),
    as_json: bool = typer.Option(False, "--json", help="Print the compare.json document to stdout instead of "
                                 "the table (messages go to stderr)."),
) -> None:
    """Compare finished runs: validation loss, perplexity (and bits per byte and robustness from `moectl eval`, when
    every run has eval/results.json), routing entropy and imbalance, as mean ± sample sd per recipe, and each
    recipe's difference to the baseline paired by seed.

    Exit codes: 0 done, 2 bad input (a folder that is not a finished run, a damaged file, a run given twice, an
    unknown --baseline); nothing is written then."""
    from moectl.compare.comparison import compare_paths

    result = compare_paths(runs or [], group_by.value, baseline)
    if out is not None:
        _check_out(out)
    console = stderr_console() if as_json else stdout_console()
    if not as_json:
        _render(result, console)
    curves = None
    if out is not None:
        from rich.markup import escape

        from moectl.compare.folder import write_comparison

        curves = write_comparison(result, out, lambda text: console.print(escape(text)))
    if as_json:
        typer.echo(json.dumps(result.to_dict(curves), indent=2))


def _check_out(out: Path) -> None:
    from moectl.errors import MoectlError

    if out.exists() and not out.is_dir():
        raise MoectlError(f"--out {out} is a file", hint="give a folder (it is made if missing)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise MoectlError(f"--out {out} cannot be made: {parent} is a file", hint="give another folder")


def _render(result, console) -> None:
    from rich.markup import escape
    from rich.table import Table

    from moectl.compare.comparison import explanation, table

    header, rows = table(result)
    n_runs = sum(len(g.runs) for g in result.groups)
    n_groups = len(result.groups)
    title = (f"comparison of {n_runs} run{'s' if n_runs != 1 else ''} in {n_groups} "
             f"group{'s' if n_groups != 1 else ''}")

    def make(header: list[str], rows: list[list[str]], left: int) -> Table:
        t = Table(title=title, title_justify="left", caption=explanation(result), caption_justify="left")
        for i, name in enumerate(header):
            t.add_column(escape(name), justify="left" if i < left else "right", overflow="fold")
        for row in rows:
            t.add_row(*map(escape, row))
        return t

    t = make(header, rows, 2)
    # too wide for the terminal: one column per group instead
    if console.measure(t, options=console.options.update_width(10_000)).maximum > console.width:
        columns = list(zip(header, *rows, strict=True))
        t = make(list(columns[0]), [list(c) for c in columns[1:]], 1)
    console.print(t)
    for note in result.notes:
        console.print(f"note: {escape(note)}")
