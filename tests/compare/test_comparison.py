"""`moectl compare` and moectl.compare.comparison: grouping by recipe, mean / sample sd / paired
differences checked by hand against the runs' summaries, the files written, and bad input
refused with exit code 2 and nothing written."""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from moectl.compare import comparison as C
from moectl.compare.plots import PLOT_HINT
from tests.compare.test_plots import read_png
from tests.conftest import train_run, trains


@pytest.fixture(scope="module")
@trains
def runs(corpus, tmp_path_factory) -> dict[str, Path]:
    """Two recipes (top-2 and top-1 routing), seeds 0 and 1 each: 4 tiny runs with validation
    every 3 steps."""
    root = tmp_path_factory.mktemp("compare-runs")
    plan = {"a0": [], "a1": ["seed=1"], "k0": ["model.moe.top_k=1"], "k1": ["model.moe.top_k=1", "seed=1"]}
    return {name: train_run(corpus, root, name, overrides, eval_every=3) for name, overrides in plan.items()}


def final_loss(run: Path) -> float:
    return json.loads((run / "logs" / "summary.json").read_text())["final_val_loss"]


def copy_run(run: Path, target: Path) -> Path:
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints"))
    return target


def test_four_runs_grouped_by_recipe(cli, runs, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", runs["a0"], runs["a1"], runs["k0"], runs["k1"], "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "compare.json").read_text())
    assert doc["format"] == "moectl.compare" and doc["version"] == 1
    assert doc["group_by"] == "recipe" and doc["source"] == "training" and doc["curves"] == "curves.png"
    base, top1 = doc["groups"]
    assert base["label"] == "tiny-train" and base["baseline"] and base["paired"] is None
    assert top1["label"] == "tiny-train (model.moe.top_k=1)"   # same name, another recipe: told apart
    assert top1["differs_from_baseline"] == {"model.moe.top_k": [2, 1]}
    assert base["seeds"] == top1["seeds"] == [0, 1]

    a = [final_loss(runs["a0"]), final_loss(runs["a1"])]
    k = [final_loss(runs["k0"]), final_loss(runs["k1"])]
    assert base["stats"]["val_loss"]["mean"] == pytest.approx((a[0] + a[1]) / 2, abs=1e-12)
    assert base["stats"]["val_loss"]["sd"] == pytest.approx(abs(a[0] - a[1]) / math.sqrt(2), abs=1e-12)
    diffs = [k[0] - a[0], k[1] - a[1]]
    paired = top1["paired"]["val_loss"]
    assert paired["n"] == 2 and paired["seeds"] == [0, 1]
    assert paired["mean"] == pytest.approx(sum(diffs) / 2, abs=1e-12)
    assert paired["sd"] == pytest.approx(abs(diffs[0] - diffs[1]) / math.sqrt(2), abs=1e-12)
    ppl = [math.exp(x) for x in k]
    assert top1["stats"]["perplexity"]["mean"] == pytest.approx(statistics.mean(ppl))
    assert top1["stats"]["perplexity"]["sd"] == pytest.approx(statistics.stdev(ppl))
    assert [r["metrics"]["val_loss"] for r in top1["runs"]] == k
    assert top1["stats"]["bits_per_byte"]["n"] == 0   # only from `moectl eval`

    md = (out / "compare.md").read_text()
    assert "| tiny-train (model.moe.top_k=1) | 0, 1 |" in md and f"{sum(diffs) / 2:+.4f}" in md
    assert "tiny-train" in result.stdout and "baseline" in result.stdout
    read_png(out / "curves.png")
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md", "curves.png"]


def test_three_runs_one_pair(cli, runs, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", runs["a0"], runs["a1"], runs["k0"], "--out", out)
    assert result.exit_code == 0, result.output
    doc = json.loads((out / "compare.json").read_text())
    base, top1 = doc["groups"]
    assert base["seeds"] == [0, 1] and top1["seeds"] == [0]
    paired = top1["paired"]["val_loss"]
    assert paired["n"] == 1 and paired["sd"] is None
    assert paired["mean"] == pytest.approx(final_loss(runs["k0"]) - final_loss(runs["a0"]), abs=1e-12)
    assert top1["stats"]["val_loss"]["sd"] is None
    assert any("1 seed paired" in n for n in doc["notes"])
    assert any("split_seed" in n for n in doc["notes"])   # seeds 0 and 1 held out different documents
    image = read_png(out / "curves.png")
    assert image.shape[1] > image.shape[0] > 300


def test_group_by_run_and_baseline(cli, runs, tmp_path):
    result = cli("compare", runs["a0"], runs["a1"], runs["k0"], "--group-by", "run", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [g["label"] for g in doc["groups"]] == ["a0", "a1", "k0"]
    a1 = doc["groups"][1]["paired"]["val_loss"]      # one run each: paired whatever the seeds
    assert a1["n"] == 1 and a1["mean"] == pytest.approx(final_loss(runs["a1"]) - final_loss(runs["a0"]))

    by_label = json.loads(cli("compare", runs["a0"], runs["k0"], runs["k1"], "--json", "--baseline",
                              "tiny-train (model.moe.top_k=1)").stdout)
    by_folder = json.loads(cli("compare", runs["a0"], runs["k0"], runs["k1"], "--json", "--baseline",
                               runs["k1"]).stdout)
    assert by_label == by_folder
    assert by_label["baseline"] == "tiny-train (model.moe.top_k=1)"
    top2 = by_label["groups"][0]
    assert top2["paired"]["val_loss"]["mean"] == pytest.approx(final_loss(runs["a0"]) - final_loss(runs["k0"]))


def test_without_out_nothing_is_written(cli, runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("compare", runs["a0"], runs["k0"])
    assert result.exit_code == 0, result.output
    assert "tiny-train" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_name_seed_and_location_do_not_split_a_group(runs, tmp_path):
    other = copy_run(runs["a0"], tmp_path / "renamed")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config.update(name="my-name", seed=7, description="a copy")
    config["train"]["run_dir"] = str(other)
    config["data"]["cache_dir"] = "/somewhere/else"
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    result = C.compare_paths([runs["a0"], runs["a1"], other])
    assert len(result.groups) == 1
    assert result.groups[0].label == "tiny-train" and result.groups[0].seeds == [0, 1, 7]
    config["train"]["log_every"] = 2          # anything else is another recipe
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    result = C.compare_paths([runs["a0"], runs["a1"], other])
    assert [g.label for g in result.groups] == ["tiny-train", "my-name"]


def eval_results(loss: float, robust: float | None = None) -> dict:
    return {"format": "moectl.eval", "version": 1, "run": "x", "step": 6, "loss": loss,
            "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2) / 3.5,
            "routing": {"overall": {"imbalance": 1.2, "entropy": 1.3, "dead_fraction": 0.0}},
            "robustness": {"defined": robust is not None, "perplexity": robust}}


def test_eval_results_are_used_when_every_run_has_them(runs, tmp_path):
    a0, a1, k0 = (copy_run(runs[n], tmp_path / n) for n in ("a0", "a1", "k0"))
    for run, loss in ((a0, 5.0), (a1, 5.2), (k0, 5.5)):
        (run / "eval").mkdir()
        (run / "eval" / "results.json").write_text(json.dumps(eval_results(loss, robust=loss * 40)))
    result = C.compare_paths([a0, a1, k0])
    assert result.source == "eval"
    base, top1 = result.groups
    assert base.stats["val_loss"]["mean"] == pytest.approx(5.1)
    assert base.stats["bits_per_byte"]["n"] == 2 and base.stats["robust_perplexity"]["mean"] == pytest.approx(204)
    assert top1.paired["val_loss"]["mean"] == pytest.approx(0.5)
    assert top1.paired["robust_perplexity"]["mean"] == pytest.approx(20)
    header, _ = C.table(result)
    assert "bits/byte" in header and "robust ppl" in header
    assert not any("different data" in n for n in result.notes)
    other = {**eval_results(5.2), "data": {"description": "some other text", "split": None}}
    (a1 / "eval" / "results.json").write_text(json.dumps(other))
    assert any("evaluated on different data" in n for n in C.compare_paths([a0, a1, k0]).notes)

    (k0 / "eval" / "results.json").unlink()   # not every run evaluated: all from training, said so
    result = C.compare_paths([a0, a1, k0])
    assert result.source == "training"
    assert result.groups[0].stats["val_loss"]["mean"] == pytest.approx((final_loss(a0) + final_loss(a1)) / 2)
    assert any("only 2 of 3 runs" in n for n in result.notes)


def test_compare_without_matplotlib(cli, runs, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "curves.png").write_bytes(b"old")   # from an earlier comparison: removed, not left stale
    (out / "compare.json").write_text(json.dumps({"format": "moectl.compare", "version": 1}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = cli("compare", runs["a0"], runs["k0"], "--out", out)
    assert result.exit_code == 0, result.output
    assert PLOT_HINT in result.stdout
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "compare.md"]
    assert json.loads((out / "compare.json").read_text())["curves"] is None


def _break(kind: str, runs: dict[str, Path], tmp: Path) -> tuple[list, str]:
    """(arguments, expected message) of one kind of bad input."""
    bad = tmp / "bad"
    if kind == "not a run":
        bad.mkdir()
        return [runs["a0"], bad], "is not a run folder"
    if kind == "missing":
        return [runs["a0"], tmp / "nowhere"], "no such run folder"
    if kind == "unfinished":
        copy_run(runs["k0"], bad)
        (bad / "logs" / "summary.json").unlink()
        return [runs["a0"], bad], "has not finished training"
    damaged = {"summary": "logs/summary.json", "metrics": "logs/metrics.jsonl", "config": "config.yaml",
               "results": "eval/results.json"}
    if kind in damaged:
        copy_run(runs["k0"], bad)
        target = bad / damaged[kind]
        target.parent.mkdir(exist_ok=True)
        text = target.read_text() if target.exists() else ""
        target.write_text({"summary": '{"steps": 6,', "metrics": "{not json\n" + text,
                           "config": "model: [unclosed\n", "results": "[1, 2]"}[kind])
        return [runs["a0"], bad], "is damaged"
    if kind == "unknown baseline":
        return [runs["a0"], runs["k0"], "--baseline", "nope"], "none of the groups"
    if kind == "no runs":
        return [], "no runs to compare"
    if kind == "twice":
        return [runs["a0"], runs["k0"], runs["a0"].parent / ".." / runs["a0"].parent.name / "a0"], "given twice"
    if kind == "same seed":
        copy_run(runs["a0"], bad)
        return [runs["a0"], bad], "same recipe with the same seed"
    if kind == "out is a file":
        return [runs["a0"], runs["k0"]], "is a file"
    raise AssertionError(kind)


BAD = ["not a run", "missing", "unfinished", "summary", "metrics", "config", "results", "unknown baseline",
       "no runs", "twice", "same seed", "out is a file"]


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_exits_2_and_writes_nothing(cli, runs, tmp_path, kind):
    args, message = _break(kind, runs, tmp_path)
    out = tmp_path / "cmp"
    if kind == "out is a file":
        out.write_text("")
    result = cli("compare", *args, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert (out.is_file() and out.read_text() == "") if kind == "out is a file" else not out.exists()


# --------------------------------------------------------------------------- the pure functions


def fake(path: str, seed: int, loss: float, **model) -> C.RunData:
    config = {"name": "r", "seed": seed, "model": {"d_model": 8, **model}, "train": {"run_dir": None}}
    return C.RunData(Path(path), config, {"final_val_loss": loss, "tokens": 100}, [], None)


def test_statistics_by_hand():
    base = [fake("b0", 0, 3.0), fake("b1", 1, 3.2), fake("b2", 2, 3.1)]
    other = [fake("o0", 0, 3.5, d_model=16), fake("o2", 2, 3.3, d_model=16), fake("o3", 3, 9.0, d_model=16)]
    result = C.compare_runs([base[0], *other, *base[1:]], baseline="r")
    assert [g.label for g in result.groups] == ["r", "r (model.d_model=16)"]
    assert result.baseline == "r" and result.groups[0].seeds == [0, 1, 2]
    b, o = result.groups
    assert b.stats["val_loss"]["mean"] == pytest.approx(3.1)
    assert b.stats["val_loss"]["sd"] == pytest.approx(0.1)
    assert o.paired["val_loss"]["seeds"] == [0, 2]       # seed 3 has no partner
    assert o.paired["val_loss"]["mean"] == pytest.approx((0.5 + 0.2) / 2)
    assert o.paired["val_loss"]["sd"] == pytest.approx(statistics.stdev([0.5, 0.2]))
    assert any("2 seeds paired" in n for n in result.notes)
    assert C.fmt_stat(o.paired["val_loss"], 4, signed=True) == "+0.3500 ± 0.2121"
    assert C.fmt_delta({"n": 0, "mean": None, "sd": None}, 2) == "– (no pairs)"


def test_labels_and_notes():
    runs = [fake("x/seed0", 0, 3.0), fake("y/seed0", 0, 3.0, d_model=4, n_layers=2, n_heads=1),
            fake("z/seed0", 0, 3.0, d_model=12)]
    assert [g.label for g in C.compare_runs(runs).groups] == [
        "r", "r (model.d_model=4, model.n_heads=1, +1 more)", "r (model.d_model=12)"]   # what differs, not "#2"
    assert [g.label for g in C.compare_runs(runs, group_by="run").groups] == ["x/seed0", "y/seed0", "z/seed0"]
    runs[2].summary["tokens"] = 200
    assert any("different numbers of tokens" in n for n in C.compare_runs(runs).notes)
    nan = fake("n", 0, float("nan"))
    doc = C.compare_runs([nan]).to_dict()
    assert doc["groups"][0]["runs"][0]["metrics"]["val_loss"] is None
    json.dumps(doc, allow_nan=False)


def test_runs_record_what_made_them_and_compare_warns_when_it_differs(runs, tmp_path):
    from moectl.rundir import RunDir

    summary = json.loads((runs["a0"] / "logs" / "summary.json").read_text())
    made = summary["provenance"]
    import torch

    assert made["torch"] == torch.__version__ and made["world_size"] == 1 and made["launcher"] == "direct"
    assert made["threads"] >= 1 and made["cpu"] and made["python"] and isinstance(made["command"], str)
    meta = json.loads(RunDir(runs["a0"]).checkpoints.latest().joinpath("meta.json").read_text())
    assert meta["provenance"]["torch"] == torch.__version__
    same = C.compare_paths([runs["a0"], runs["a1"]])
    assert not any("not made alike" in n for n in same.notes)
    assert f"Losses over {summary['val_tokens']:,} validation tokens each" in C.explanation(same)

    other = copy_run(runs["a1"], tmp_path / "a1-old-torch")
    edited = json.loads((other / "logs" / "summary.json").read_text())
    edited["provenance"]["torch"] = "2.11.0"
    (other / "logs" / "summary.json").write_text(json.dumps(edited))
    notes = [n for n in C.compare_paths([runs["a0"], other]).notes if "not made alike" in n]
    assert len(notes) == 1 and f"torch: {torch.__version__} ({runs['a0']}), 2.11.0 ({other})" in notes[0]
