"""The PNG plots: each writes a valid image that matplotlib reads back at a sensible size, from
results in the format `moectl eval` writes; without matplotlib they refuse cleanly."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from moectl.compare import plots
from moectl.errors import MoectlError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_results(n_layers: int = 4, n_experts: int = 8, bins: int = 20) -> dict:
    order = [f"L{i}" for i in range(n_layers)]
    layers = {}
    for i, name in enumerate(order):
        raw = [1.0 + 0.8 * math.sin(1.3 * e + i) for e in range(n_experts)]
        utilisation = [n_experts * r / sum(raw) for r in raw]
        edges = [math.log(n_experts) * b / bins for b in range(bins + 1)]
        counts = [int(500 * math.exp(-((b - 0.7 * bins) ** 2) / 8)) for b in range(bins)]
        layers[name] = {"utilisation": utilisation, "entropy_hist": {"edges": edges, "counts": counts}}
    mi = [[1.2 if i == j else 0.1 / (1 + abs(i - j)) for j in range(n_layers)] for i in range(n_layers)]
    top1 = [[0.9 if i == j else 0.05 / (1 + abs(i - j)) for j in range(n_layers)] for i in range(n_layers)]
    return {"format": "moectl.eval", "version": 1, "run": "runs/demo", "step": 600,
            "routing": {"layer_order": order, "layers": layers,
                        "mutual_information": {"layers": order, "binned": mi, "top1": top1}}}


def fake_run(root: Path, name: str, steps: int = 40, eval_every: int = 10, offset: float = 0.0) -> Path:
    """A run folder holding only logs/metrics.jsonl, in the format training writes."""
    run = root / name
    (run / "logs").mkdir(parents=True)
    lines = []
    for s in range(1, steps + 1):
        lines.append({"type": "train", "step": s, "tokens": 128 * s, "loss": 6 - math.log(s) / 3 + offset
                      + 0.05 * math.sin(s)})
        if s % eval_every == 0:
            lines.append({"type": "eval", "step": s, "tokens": 128 * s, "val_loss": 6.1 - math.log(s) / 3 + offset})
    (run / "logs" / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def read_png(path: Path):
    """The image as an array (rows, columns, channels), after checking it is a PNG."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    return matplotlib.image.imread(path)


@pytest.mark.parametrize("n_layers, n_experts", [(4, 8), (8, 48), (1, 2)])
def test_routing_plots(tmp_path, n_layers, n_experts):
    results = synthetic_results(n_layers, n_experts)
    for fn in (plots.expert_load_heatmap, plots.entropy_histograms, plots.mutual_information_heatmap):
        path = tmp_path / f"{fn.__name__}.png"
        assert fn(results, path) == path
        image = read_png(path)
        assert 250 <= image.shape[0] <= 2000 and 350 <= image.shape[1] <= 2500, (fn.__name__, image.shape)
        if fn is plots.expert_load_heatmap:   # a column per expert: wider with more of them
            assert image.shape[1] / image.shape[0] > (2.2 if n_experts >= 48 else 1.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entropy_histograms.png", "expert_load_heatmap.png",
                                                          "mutual_information_heatmap.png"]   # no temp files


def test_missing_entries_and_bad_shapes_are_clear(tmp_path):
    results = synthetic_results(3, 4)
    results["routing"]["layers"]["L1"]["utilisation"] = [1.0, None, 1.2]   # ragged, a gap: grey cells
    plots.expert_load_heatmap(results, tmp_path / "gaps.png")
    with pytest.raises(MoectlError, match="routing.mutual_information"):
        plots.mutual_information_heatmap({"run": "x", "routing": {"layers": {}}}, tmp_path / "x.png")
    results["routing"]["mutual_information"]["top1"] = [[0.0]]
    with pytest.raises(MoectlError, match="not 3x3"):
        plots.mutual_information_heatmap(results, tmp_path / "y.png")
    results["routing"]["layers"]["L0"]["entropy_hist"]["counts"].append(3)
    with pytest.raises(MoectlError, match="edges"):
        plots.entropy_histograms(results, tmp_path / "z.png")


def test_training_and_compare_curves(tmp_path):
    runs = [fake_run(tmp_path, f"r{i}", offset=0.02 * i) for i in range(3)]
    short = fake_run(tmp_path, "short", steps=6, eval_every=3)
    path = plots.training_curves([(r.name, r) for r in [*runs, short]], tmp_path / "train.png")
    image = read_png(path)
    assert image.shape[1] > image.shape[0]
    path = plots.compare_curves({"a": [("seed 0", runs[0]), ("seed 1", runs[1])], "b": [("seed 0", runs[2])]},
                                tmp_path / "out" / "curves.png")
    read_png(path)


def test_without_matplotlib(tmp_path, monkeypatch):
    import matplotlib.figure  # noqa: F401  (cached submodules must not let a plot through)

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert not plots.plots_available()
    results = synthetic_results()
    run = fake_run(tmp_path, "r")
    calls = [lambda p: plots.expert_load_heatmap(results, p), lambda p: plots.entropy_histograms(results, p),
             lambda p: plots.mutual_information_heatmap(results, p), lambda p: plots.training_curves([("r", run)], p),
             lambda p: plots.compare_curves({"g": [("r", run)]}, p)]
    for call in calls:
        with pytest.raises(plots.PlotsUnavailable) as info:
            call(tmp_path / "x.png")
        assert info.value.exit_code == 2 and info.value.hint == plots.PLOT_HINT
    assert "-m pip install 'matplotlib>=3.7'" in plots.PLOT_HINT
    assert not (tmp_path / "x.png").exists()


@pytest.mark.processes
def test_comparing_and_plotting_import_neither_matplotlib_nor_torch():
    """Comparing runs needs no torch (a laptop compares a cluster's runs), and matplotlib is imported
    only when a plot is drawn."""
    import subprocess

    code = ("import sys, moectl.compare.plots, moectl.compare.comparison, moectl.compare.folder; "
            "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"
