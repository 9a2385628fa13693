"""The terminal report of `moectl eval`: rich tables over a results.json record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

BALANCE_COLUMNS = [  # (results key, header, format)
    ("imbalance", "max/mean", "{:.2f}"),
    ("cv", "CV", "{:.2f}"),
    ("dead_fraction", "dead", "{:.0%}"),
    ("diversity", "diversity", "{:.2f}"),
    ("experts_per_token", "experts/tok", "{:.2f}"),
]
CONFIDENCE_COLUMNS = [
    ("entropy", "entropy", "{:.3f}"),
    ("topk_mass", "top-k mass", "{:.3f}"),
    ("inner_balance", "IB", "{:.2f}"),
    ("outer_balance", "OB", "{:.3f}"),
    ("logit_std", "logit std", "{:.3f}"),
]
PREFERRED_SHOWN = 4


def _fmt(fmt: str, value: Any) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return fmt.format(value)


def scores_table(results: dict[str, Any]):
    data = results["data"]
    t = Table(title=f"{results['recipe']} · step {results['step']} · {data['description']} ({data['split']})",
              title_justify="left")
    for col in ("", "loss (nats/token)", "perplexity", "bits/byte"):
        t.add_column(col, justify="right" if col else "left")
    t.add_row("as trained", _fmt("{:.4f}", results["loss"]), _fmt("{:.2f}", results["perplexity"]),
              _fmt("{:.4f}", results["bits_per_byte"]))
    rob = results.get("robustness")
    if rob and rob["defined"]:
        t.add_row("top-1 expert dropped", _fmt("{:.4f}", rob["loss"]), _fmt("{:.2f}", rob["perplexity"]),
                  _fmt("{:.4f}", rob["bits_per_byte"]))
    t.caption = f"{results['tokens_evaluated']:,} tokens, {results['bytes']:,} bytes on {results['device']} " \
                f"({results['dtype']})"
    return t


def routing_table(routing: dict[str, Any], title: str, columns: list[tuple[str, str, str]],
                  agreement: bool = False):
    t = Table(title=title, title_justify="left")
    t.add_column("layer")
    for _, header, _ in columns:
        t.add_column(header, justify="right")
    agreed = [v["variant_agreement"] for v in routing["layers"].values() if v.get("variant_agreement")]
    variant = (agreed[0].get("with") or "variant's choice") if agreement and agreed else None
    if variant:
        t.add_column(f"= {variant} (top-1 / set)", justify="right")
    rows = [(name, routing["layers"][name]) for name in routing["layer_order"]] + [("mean", routing["overall"])]
    for name, v in rows:
        cells = [_fmt(fmt, v.get(key)) for key, _, fmt in columns]
        if variant:
            a = v.get("variant_agreement")
            cells.append(f"{a['top1']:.0%} / {a['overlap']:.0%}" if a else "–")
        t.add_row(name, *cells, end_section=name == rows[-2][0])
    return t


def preferred_table(routing: dict[str, Any]):
    """The tokens each expert of the first and last routed layer prefers."""
    order = routing["layer_order"]
    shown = [order[0]] + ([order[-1]] if len(order) > 1 else [])
    t = Table(title="tokens each expert prefers (share of the token's occurrences routed there)",
              title_justify="left")
    t.add_column("layer")
    t.add_column("expert", justify="right")
    t.add_column("load", justify="right")
    t.add_column("tokens")
    for name in shown:
        layer = routing["layers"][name]
        for e, prefs in enumerate(layer.get("preferred_tokens") or []):
            text = "  ".join(f"{escape(repr(p['token']))} {p['share']:.0%}" for p in prefs[:PREFERRED_SHOWN])
            t.add_row(name, str(e), _fmt("{:.2f}", layer["utilisation"][e]), text,
                      end_section=e == layer["experts"] - 1)
    return t


def print_results(results: dict[str, Any], console, written: list[Path]) -> None:
    console.print(scores_table(results))
    rob = results.get("robustness")
    if rob and not rob["defined"]:
        console.print(f"routing robustness: not defined here ({rob['reason']})")
    routing = results.get("routing")
    if routing:
        console.print(routing_table(routing, "expert load per layer (docs/eval.md defines each measure)",
                                    BALANCE_COLUMNS))
        console.print(routing_table(routing, "router confidence per layer", CONFIDENCE_COLUMNS, agreement=True))
        mi = routing.get("mutual_information")
        if mi and len(mi["layers"]) > 1:
            off = [mi["top1"][i][j] for i in range(len(mi["layers"])) for j in range(len(mi["layers"])) if i != j]
            off_b = [mi["binned"][i][j] for i in range(len(mi["layers"])) for j in range(len(mi["layers"])) if i != j]
            console.print(f"cross-layer routing MI (mean over layer pairs): top-1 {sum(off) / len(off):.3f} nats, "
                          f"binned {sum(off_b) / len(off_b):.3f} nats (on {mi['binned_tokens']:,} tokens)")
        if any(v.get("preferred_tokens") for v in routing["layers"].values()):
            console.print(preferred_table(routing))
    tasks = results.get("tasks")
    if tasks:
        _print_tasks(tasks, console)
    for path in written:
        console.print(f"wrote {path}")


def _print_tasks(tasks: dict[str, Any], console) -> None:
    t = Table(title="downstream tasks (lm-evaluation-harness)", title_justify="left")
    for col in ("task", "metric", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    for task, metrics in tasks["results"].items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                t.add_row(task, metric, f"{value:.4f}")
    console.print(t)
