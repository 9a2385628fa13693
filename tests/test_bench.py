"""The benchmark scripts still run (at toy sizes; they time nothing here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.processes]


def test_expert_backends_bench_runs():
    proc = subprocess.run([sys.executable, "bench/experts.py", "--tokens", "256", "--d-model", "64", "--hidden", "64",
                           "--experts", "4", "--top-k", "2", "--reps", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "speed-ups are over grouped_mm" in proc.stdout
    row = proc.stdout.splitlines()[-1]
    assert "loop" in row and "grouped_mm" in row and "diff 0e+00" in row


@pytest.mark.slow
def test_vs_transformers_bench_prints_ratio():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, "bench/vs_transformers.py", "--d-model", "32", "--layers", "1",
                           "--heads", "2", "--hidden", "32", "--vocab", "128", "--seq", "16", "--batch", "2",
                           "--rounds", "1", "--steps", "1", "--warmup", "0", "--backend", "loop,grouped_mm"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for dtype in ("fp32", "bf16"):
        assert f"{dtype}: tokens/s" in proc.stdout
    assert proc.stdout.count("ratio moectl grouped_mm / transformers") == 2
    assert "transformers eager" in proc.stdout and "transformers grouped_mm" in proc.stdout


@pytest.mark.slow
def test_gpu_check_script_dry_run(tmp_path):
    """The GPU check script runs end to end on CPU (--dry: tiny sizes, Triton's interpreter)."""
    import os

    env = dict(os.environ, OUT=str(tmp_path), PY_OVERRIDE=sys.executable)
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--dry"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("env", "parity", "experts", "profile", "peers"):
        assert (tmp_path / f"{name}.txt").is_file(), name
    assert "exit 0" in (tmp_path / "parity.txt").read_text()
    assert (tmp_path / "profile.json").is_file()


@pytest.mark.parametrize("shape", ["qwen3_moe", "dots1", "deepseek_v3"])
def test_convert_memory_bench_runs(shape):
    """The conversion memory benchmark at a tiny size: both directions run under /usr/bin/time and the
    round trip is bit for bit in bf16."""
    import shutil

    if shutil.which("/usr/bin/time") is None:
        pytest.skip("no /usr/bin/time")
    proc = subprocess.run([sys.executable, "bench/convert_memory.py", "--shape", shape, "--tiny"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "import  peak" in proc.stdout and "export  peak" in proc.stdout
    assert "round trip bit for bit, bf16 kept: True" in proc.stdout


@pytest.mark.slow
def test_ep_check_script_dry_run(tmp_path):
    """The expert-parallel GPU script runs end to end on CPU (--dry: two gloo processes, tiny sizes):
    the exchange table, parity against FSDP within its tolerance, and a speed row per degree and routing."""
    import os

    env = dict(os.environ, OUT=str(tmp_path), PY_OVERRIDE=sys.executable)
    proc = subprocess.run(["bash", "bench/ep_check.sh", "--dry"], cwd=REPO, capture_output=True, text=True,
                          timeout=1200, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exchange = (tmp_path / "exchange.txt").read_text()
    assert "raw all_to_all_single" in exchange and "moectl exchange there and back, skewed routing" in exchange
    parity = (tmp_path / "parity.txt").read_text()
    assert "parity-ep2" in parity and "exit 0" in parity
    speed = (tmp_path / "speed.txt").read_text()
    for name in ("speed-ep1-learned", "speed-ep1-uniform", "speed-ep2-learned", "speed-ep2-uniform"):
        assert name in speed, speed
    ep_rows = [line for line in speed.splitlines() if line.startswith("speed-ep2")]
    assert all(line.rstrip().endswith("%") for line in ep_rows), speed   # the exchange's share is measured


@pytest.mark.slow
def test_experiments_report_is_built_by_compare(tmp_path):
    """--report-only on finished runs (their files written here, not trained): the study's table is
    `moectl compare`'s (mean, sd and paired difference of the eval losses), and the robustness
    table is each arm's perplexity with and without the top-1 expert."""
    import json

    sys.path.insert(0, str(REPO / "bench"))
    try:
        import experiments
    finally:
        sys.path.remove(str(REPO / "bench"))
    from moectl.recipe.load import dump_recipe, load_recipe
    from moectl.rundir import RESULTS_FORMAT as FORMAT
    from moectl.rundir import RESULTS_VERSION as VERSION

    study = experiments.STUDIES["cartesian"]
    for j, arm in enumerate(study.arms):
        for seed in (0, 1):
            run = experiments.run_dir(tmp_path, arm, seed)
            (run / "eval").mkdir(parents=True)
            (run / "logs").mkdir()
            (run / "config.yaml").write_text(dump_recipe(load_recipe(arm.recipe, [f"seed={seed}", *arm.overrides])))
            loss = 3.0 + 0.05 * j + 0.01 * seed * (1 + j)
            (run / "logs" / "summary.json").write_text(json.dumps({"steps": 400, "tokens": 819200,
                                                                   "final_val_loss": loss + 1}))
            record = {"type": "train", "step": 400, "loss": 3.0, "imbalance_max": 1.5 + j,
                      "layers": {"L0": {"entropy": 2.0}, "L1": {"entropy": 2.2}}}
            (run / "logs" / "metrics.jsonl").write_text(json.dumps(record) + "\n")
            (run / "eval" / "results.json").write_text(json.dumps({
                "format": FORMAT, "version": VERSION, "step": 400, "loss": loss, "perplexity": 20.0 + j + seed,
                "bits_per_byte": 1.0, "robustness": {"defined": True, "perplexity": 40.0 * (j + 1) + seed}}))
    proc = subprocess.run([sys.executable, "bench/experiments.py", "cartesian", "--report-only", "--seeds", "0", "1",
                           "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    tables = [[line.split(" | ") for line in block.splitlines() if line.startswith("| ")]
              for block in proc.stdout.split("\n\n") if block.startswith("| ")]
    compare, robust = tables
    assert len(compare) == 4 and "moectl eval" in proc.stdout   # header and three arms
    header = [h.strip("| ") for h in compare[0]]
    row = dict(zip(header, [c.strip("| ") for c in compare[2]], strict=True))   # CartesianMoE (second arm)
    assert row["val loss"] == "3.0600 ± 0.0141" and row["per seed"] == "3.0500, 3.0700"
    assert row["Δ val loss"] == "+0.0550 ± 0.0071 (n=2)"   # +0.05 and +0.06, paired by seed
    assert robust[1][0] == "| SMoE-Share" and robust[2][1:] == ["21.50 ± 0.71", "80.50 ± 0.71", "3.75 ± 0.09 |"]
    # One row and its baseline: --arm
    proc = subprocess.run([sys.executable, "bench/experiments.py", "cartesian", "--arm", "SMoE-Top3", "--report-only",
                           "--seeds", "0", "1", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| cartesianmoe-")]
    assert len(rows) == 2 and "smoe-share" in rows[0] and "top3" in rows[1]


@pytest.mark.slow
def test_sigkill_bench_runs():
    """Two kills of a short run: nothing lost, the resumed run equals the uninterrupted one."""
    proc = subprocess.run([sys.executable, "bench/sigkill.py", "--kills", "2", "--steps", "30", "--window", "4"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checkpoints lost: 0" in proc.stdout and "weights True, per-step losses True" in proc.stdout


def test_experiment_folder_names_stay_short_and_distinct():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import experiments
    finally:
        sys.path.remove(str(REPO / "bench"))
    long = tuple(f"model.moe.competition.balance_option_{i}=value_{i}" for i in range(8))
    a = experiments.Arm("a", "papers/competesmoe/competesmoe-154m-tiny", long)
    b = experiments.Arm("b", "papers/competesmoe/competesmoe-154m-tiny", long[:-1] + ("other=1",))
    assert len(a.slug()) <= 150 and len(b.slug()) <= 150 and a.slug() != b.slug()
    short = experiments.Arm("c", "papers/rmoe/rmoe-enwik8-tiny", ("model.moe.router_init=sigma_moe",))
    assert short.slug() == "papers_rmoe_rmoe-enwik8-tiny__model.moe.router-init=sigma-moe"   # unchanged names
    assert all(len(arm.slug()) <= 150 for study in experiments.STUDIES.values() for arm in study.arms)
