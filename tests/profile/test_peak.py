"""The peak MFU is stated against: the GPU datasheet table, the recipe's own number, and a CPU
measurement that load at start-up cannot lower (so logged MFU stays at or below 100%)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch

from moectl.profile import measure
from tests.conftest import train_recipe_text


@pytest.mark.parametrize(("name", "dtype", "tf32", "tflops", "source"), [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989.4, "H100 SXM datasheet, dense bf16"),
    ("NVIDIA H100 PCIe", torch.bfloat16, False, 756.5, "H100 PCIe"),
    ("NVIDIA H200", torch.float16, False, 989.4, "H200 datasheet, dense fp16"),
    ("NVIDIA A100-SXM4-80GB", torch.float32, True, 156.0, "TF32"),
    ("NVIDIA A100-SXM4-80GB", torch.float32, False, 19.5, "A100 datasheet, fp32"),
    ("NVIDIA L40S", torch.bfloat16, False, 362.1, "L40S"),
    ("NVIDIA L4", torch.bfloat16, False, 121.0, "L4 datasheet"),
])
def test_gpu_table(name, dtype, tf32, tflops, source):
    peak = measure.gpu_table_peak(name, dtype, tf32)
    assert peak.flops == pytest.approx(tflops * 1e12) and source in peak.source


def test_unknown_gpu_and_stated_peak():
    assert measure.gpu_table_peak("Some Future GPU", torch.bfloat16, False) is None
    peak = measure.device_peak(torch.device("cpu"), torch.float32, stated_tflops=2.5)
    assert peak.flops == 2.5e12 and peak.source == "train.peak_tflops"
    assert peak.describe() == "2.5 TFLOP/s (train.peak_tflops)"


def test_cpu_peak_counts_every_thread():
    peak = measure.device_peak(torch.device("cpu"), torch.float32)
    assert f"× {torch.get_num_threads()} thread" in peak.source
    # No matmul on all threads beats it (10% for timer noise: a model step is far below a matmul).
    assert measure.peak_flops(torch.device("cpu"), torch.float32, size=512, reps=5) <= 1.1 * peak.flops


@contextlib.contextmanager
def busy_cpu():
    """Every core busy with two spinning processes each, for the duration."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * (os.cpu_count() or 1))]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


@pytest.mark.train
@pytest.mark.processes
def test_mfu_stays_below_one_when_start_up_is_loaded(corpus, tmp_path, monkeypatch):
    """The machine is busy while the trainer states its peak, and idle while it trains: MFU, which
    compares the idle training against the peak, must stay a fraction."""
    from moectl.recipe.load import load_recipe
    from moectl.rundir import RunDir
    from moectl.train.trainer import train

    real = measure.device_peak
    seen = []

    def loaded_peak(*args, **kwargs):
        with busy_cpu():
            peak = real(*args, **kwargs)
        seen.append(peak)
        return peak

    monkeypatch.setattr(measure, "device_peak", loaded_peak)
    path = tmp_path / "wide.yaml"
    path.write_text(train_recipe_text(corpus, max_steps=6, batch_size=8, log_every=2, eval_every="null",
                                      checkpoint_every=6))
    rec = load_recipe(path, ["model.d_model=256", "model.ffn_hidden=1024", "model.moe.expert_hidden=512",
                             "model.seq_len=128", "model.n_heads=4"])
    result = train(rec, run_dir=tmp_path / "run", resume="never", show_progress=False)
    assert len(seen) == 1
    mfus = [r["mfu"] for r in RunDir(tmp_path / "run").read_metrics() if r["type"] == "train"]
    assert len(mfus) == 3 and all(0 < m <= 1 for m in mfus), mfus
    assert 0 < result.mfu <= 1 and result.mfu_peak == seen[0].describe()
