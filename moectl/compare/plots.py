"""PNG plots of a run's routing and of training curves. matplotlib is optional (`moectl[plot]`):
it is imported only when a plot is drawn, and without it every plot function raises
`PlotsUnavailable` (a MoectlError whose hint is PLOT_HINT). Callers that can do without plots
check `plots_available()` first and print PLOT_HINT instead.

Figures are drawn on the Agg canvas directly (no pyplot, no global backend switch, so a notebook's
own matplotlib setup is left alone) and written atomically: a temporary file in the target's
folder, then renamed over it. Each function returns the path it wrote.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np

from moectl.compare.comparison import validation_curve
from moectl.errors import MoectlError
from moectl.extras import install_hint
from moectl.fsutil import atomic_write_bytes
from moectl.rundir import RunDir

PLOT_HINT = install_hint("plot")
DPI = 110


class PlotsUnavailable(MoectlError):
    """matplotlib is not installed."""

    def __init__(self) -> None:
        super().__init__("plots need matplotlib, which is not installed", hint=PLOT_HINT)


def plots_available() -> bool:
    """Whether matplotlib can be imported (the plot functions work)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(width: float, height: float):
    try:
        import matplotlib  # noqa: F401  (first: its submodules may be cached after it went missing)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotsUnavailable() from None
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _get(results: dict[str, Any], *keys: str) -> Any:
    value: Any = results
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise MoectlError(f"the evaluation results have no {'.'.join(keys[:i + 1])}",
                              hint="give the results of `moectl eval` (eval/results.json)")
        value = value[key]
    return value


def _layers(results: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    layers = _get(results, "routing", "layers")
    order = results["routing"].get("layer_order") or list(layers)
    missing = [n for n in order if n not in layers]
    if missing:
        raise MoectlError(f"routing.layer_order names layers without results: {', '.join(missing)}")
    return list(order), layers


def _title(results: dict[str, Any], what: str) -> str:
    step = results.get("step")
    return f"{what}: {results.get('run', 'run')}" + (f" (step {step:,})" if isinstance(step, int) else "")


def _matrix(rows: list[list[Any]]):
    """A float array from ragged rows of numbers or None (missing: NaN)."""
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), np.nan)
    for i, row in enumerate(rows):
        out[i, :len(row)] = [np.nan if v is None else float(v) for v in row]
    return out


def _annotate(ax, data, fmt: str, far) -> None:
    """Write each cell's value in it (white on a dark cell, where `far(value)`)."""
    for (i, j), v in np.ndenumerate(data):
        if not np.isnan(v):
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7,
                    color="white" if far(v) else "black")


def _ticks(ax, axis: str, labels: list[str], rotate: bool = False) -> None:
    """One tick per label, or per 2, 4, 8, ... labels when there are more than 24."""
    every = 2 ** math.ceil(math.log2(len(labels) / 24)) if len(labels) > 24 else 1
    pos = list(range(0, len(labels), every))
    if axis == "x":
        ax.set_xticks(pos, [labels[p] for p in pos], rotation=45 if rotate else 0,
                      ha="right" if rotate else "center")
    else:
        ax.set_yticks(pos, [labels[p] for p in pos])


def expert_load_heatmap(results: dict[str, Any], path: str | Path) -> Path:
    """Layers x experts: each expert's load over its ideal load (1 = balanced), on a diverging
    scale centred on 1 (blue: under-used, red: over-used, grey: no such expert)."""
    fig = _figure(1, 1)   # fails first without matplotlib
    from matplotlib import colormaps
    from matplotlib.colors import TwoSlopeNorm

    names, layers = _layers(results)
    data = _matrix([_get(layers[n], "utilisation") for n in names])
    n_layers, n_experts = data.shape
    vmax = max(2.0, float(np.nanmax(data)) if np.isfinite(data).any() else 2.0)
    fig.set_size_inches(min(max(5.0, 0.42 * n_experts + 2.8), 18), min(max(2.8, 0.42 * n_layers + 1.8), 14))
    ax = fig.add_subplot()
    im = ax.imshow(data, cmap=colormaps["RdBu_r"].with_extremes(bad="0.85"), aspect="auto",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax), interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.02).set_label("load / ideal load (1 = balanced)")
    _ticks(ax, "x", [str(e) for e in range(n_experts)])
    _ticks(ax, "y", names)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    if n_layers * n_experts <= 256:
        _annotate(ax, data, ".2f", lambda v: v < 0.35 or v > 1 + 0.65 * (vmax - 1))
    ax.set_title(_title(results, "expert load"))
    return _save(fig, path)


def entropy_histograms(results: dict[str, Any], path: str | Path) -> Path:
    """One histogram per layer of the per-token routing entropy (nats), with its maximum ln E (a
    uniform choice over E experts) dashed."""
    fig = _figure(1, 1)
    names, layers = _layers(results)
    ncols = min(4, len(names)) or 1
    nrows = max(1, math.ceil(len(names) / ncols))
    fig.set_size_inches(3.1 * ncols + 0.4, 2.2 * nrows + 0.7)
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True)
    for k, ax in enumerate(axes.flat):
        if k >= len(names):
            ax.set_visible(False)
            continue
        hist = _get(layers[names[k]], "entropy_hist")
        edges, counts = list(hist["edges"]), list(hist["counts"])
        if len(edges) != len(counts) + 1:
            raise MoectlError(f"layer {names[k]}: entropy_hist has {len(edges)} edges for {len(counts)} counts")
        ax.stairs(counts, edges, fill=True, color="C0", alpha=0.8)
        ln_e = float(edges[-1])
        ax.axvline(ln_e, color="C3", ls="--", lw=1.2)
        ax.set_ylim(0, 1.2 * max(max(counts, default=0), 1))   # headroom for the ln E label
        ax.annotate(f"ln {round(math.exp(ln_e))} = {ln_e:.2f}", (ln_e, 1), xycoords=("data", "axes fraction"),
                    xytext=(-3, -3), textcoords="offset points", ha="right", va="top", fontsize=7, color="C3",
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
        ax.set_title(names[k], fontsize=9)
        ax.tick_params(labelsize=7)
        if k % ncols == 0:
            ax.set_ylabel("tokens", fontsize=8)
        if k + ncols >= len(names):
            ax.set_xlabel("routing entropy (nats)", fontsize=8)
            ax.tick_params(labelbottom=True)
    fig.suptitle(_title(results, "routing entropy per token"), fontsize=10)
    return _save(fig, path)


def mutual_information_heatmap(results: dict[str, Any], path: str | Path) -> Path:
    """Layer x layer mutual information (nats) between the routing of two layers: of binned
    routing distributions (left) and of top-1 experts (right). The diagonal (a layer with itself,
    its entropy) is greyed out so that it does not set the colour scale."""
    fig = _figure(1, 1)
    from matplotlib import colormaps

    mi = _get(results, "routing", "mutual_information")
    labels = [str(x) for x in _get(mi, "layers")]
    n = len(labels)
    side = min(max(3.2, 0.45 * n + 1.8), 9)
    fig.set_size_inches(2 * side + 1.2, side + 0.5)
    for k, (key, what) in enumerate((("binned", "binned routing"), ("top1", "top-1 expert"))):
        ax = fig.add_subplot(1, 2, k + 1)
        data = _matrix(_get(mi, key))
        if data.shape != (n, n):
            raise MoectlError(f"routing.mutual_information.{key} is {data.shape[0]}x{data.shape[1]}, "
                              f"not {n}x{n} like its layers")
        np.fill_diagonal(data, np.nan)
        vmax = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
        im = ax.imshow(data, cmap=colormaps["viridis"].with_extremes(bad="0.85"), vmin=0.0,
                       vmax=max(vmax, 1e-9), interpolation="nearest")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03).set_label("mutual information (nats)")
        _ticks(ax, "x", labels, rotate=True)
        _ticks(ax, "y", labels)
        ax.set_xlabel("layer")
        ax.set_ylabel("layer")
        if n <= 12:
            _annotate(ax, data, ".3f", lambda v, top=vmax: v < 0.6 * top)
        ax.set_title(what, fontsize=10)
    fig.suptitle(_title(results, "routing mutual information between layers")
                 + "\ngrey diagonal: a layer with itself, left out", fontsize=10)
    return _save(fig, path)


# --------------------------------------------------------------------------- curves


def _train_curve(records: list[dict[str, Any]]) -> tuple[list[int], list[float], list[float]]:
    """(steps, training losses, tokens) of a run's training records, non-finite losses left out."""
    pts = [(r["step"], r["loss"], r.get("tokens")) for r in records if r.get("type") == "train"
           and isinstance(r.get("step"), int) and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def _smooth(values: list[float]) -> list[float]:
    """Trailing moving average over about a twentieth of the points."""
    w = max(2, len(values) // 20)
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    i = np.arange(1, len(values) + 1)
    lo = np.maximum(0, i - w)
    return list((c[i] - c[lo]) / (i - lo))


def _step_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)


def _tokens_axis(ax, per_step: float | None) -> None:
    """A second x axis (top) in training tokens, when every run trains as many tokens per step."""
    if not per_step:
        return
    from matplotlib.ticker import EngFormatter

    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
    top.xaxis.set_major_formatter(EngFormatter(sep=""))
    top.set_xlabel("tokens", fontsize=8)
    top.tick_params(labelsize=7)


def _tokens_per_step(curves: list[tuple[list[int], list[float], list[Any]]]) -> float | None:
    rates = {round(t[-1] / s[-1], 6) for s, _, t in curves if s and isinstance(t[-1], (int, float)) and s[-1]}
    return rates.pop() if len(rates) == 1 else None


def training_curves(runs: list[tuple[str, Path]], path: str | Path) -> Path:
    """Training loss (left; smoothed, the raw values faint, when there are many points) and
    validation loss (right) against step, one colour per run (label, run folder)."""

    fig = _figure(11, 4.4)
    ax_train, ax_val = fig.subplots(1, 2)
    curves = []
    for i, (label, run_dir) in enumerate(runs):
        records = RunDir(run_dir).read_metrics()
        steps, losses, tokens = _train_curve(records)
        curves.append((steps, losses, tokens))
        color = f"C{i % 10}"
        if len(steps) >= 30:
            ax_train.plot(steps, losses, color=color, alpha=0.25, lw=0.8)
            ax_train.plot(steps, _smooth(losses), color=color, lw=1.6, label=label)
        else:
            ax_train.plot(steps, losses, color=color, lw=1.4, marker=".", label=label)
        vs, vl = validation_curve(records)
        ax_val.plot(vs, vl, color=color, lw=1.6, marker="o", ms=3, label=label)
    for ax, what in ((ax_train, "training loss"), (ax_val, "validation loss")):
        ax.set_title(what, fontsize=10, fontweight="bold")
        _step_axis(ax)
        ax.set_ylabel("loss (nats/token)")
        _tokens_axis(ax, _tokens_per_step(curves))
    if runs:
        ax_val.legend(fontsize=8)
    return _save(fig, path)


def _mean_curve(curves: list[tuple[list[int], list[float]]]) -> tuple[list[int], list[float]]:
    """The mean over runs at the steps every run has a value for."""
    tables = [dict(zip(s, v, strict=True)) for s, v in curves if s]
    if not tables:
        return [], []
    common = sorted(set.intersection(*(set(t) for t in tables)))
    return common, [sum(t[s] for t in tables) / len(tables) for s in common]


def compare_curves(groups: dict[str, list[tuple[str, Path]]], path: str | Path) -> Path:
    """Validation loss against step for groups of runs ({group label: [(run label, run folder)]}):
    one colour per group, each run thin, the group's mean over its runs bold."""

    fig = _figure(8.5, 5.2)
    ax = fig.add_subplot()
    for i, (label, runs) in enumerate(groups.items()):
        color = f"C{i % 10}"
        curves = [validation_curve(RunDir(p).read_metrics()) for _, p in runs]
        if len(curves) > 1:
            for steps, losses in curves:
                ax.plot(steps, losses, color=color, alpha=0.45, lw=1.1)
        steps, means = _mean_curve(curves)
        ax.plot(steps, means, color=color, lw=2.6, marker="o" if len(steps) <= 12 else None, ms=4,
                label=f"{label} (mean of {len(curves)})" if len(curves) > 1 else label)
    _step_axis(ax)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss (thin: each run; bold: the group's mean)", fontsize=10)
    if groups:
        ax.legend(fontsize=9)
    return _save(fig, path)
