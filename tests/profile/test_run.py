"""`moectl profile`: the stage tables, the backend table, the trace and the JSON; and the stage
labels being free outside a profile."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from moectl.core import stages

SMALL = ["model.n_layers=2", "model.seq_len=64", "train.batch_size=4"]


@pytest.mark.slow
def test_profile_quickstart_tables_trace_and_json(cli, tmp_path):
    trace, numbers = tmp_path / "t" / "trace.json", tmp_path / "p.json"
    result = cli("profile", "quickstart", *SMALL, "--steps", "2", "--warmup", "1", "--trace", trace,
                 "--json", numbers)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("Whole model, per step", "MoE block layers.1.mlp alone", "Expert backends", "kernel time:",
                 "MFU", "jagged", "uniform", "grouped_mm"):
        assert text in out, text
    data = json.loads(numbers.read_text())
    stages_ = {r["stage"]: r for r in data["model_stages"]}
    for name in ("attention", "norms", "router", "dispatch", "experts", "combine", "dense_ffn", "head_loss",
                 "optimizer"):
        assert stages_[name]["total_ms"] > 0, name
    # Backward time is attributed to the stages whose forward made it.
    assert stages_["experts"]["backward_ms"] > 0 and stages_["attention"]["backward_ms"] > 0
    assert stages_["experts"]["tflops_per_s"] > 0 and stages_["dispatch"]["flops"] is None
    # The stages cover the profiled step (nothing large unaccounted for).
    covered = sum(r["total_ms"] for r in data["model_stages"])
    assert 0.7 * data["profiled_step_ms"] <= covered <= 1.05 * data["profiled_step_ms"]
    assert {r["stage"] for r in data["block_stages"]} >= {"router", "dispatch", "experts", "combine"}
    assert abs(sum(data["kernel_share"].values()) - 1) < 1e-6 and data["kernel_share"]["matmul"] > 0.1
    assert 0 < data["mfu"] < 1 and data["peak_tflops"] > 0 and data["tokens_per_step"] == 4 * 64
    backends = {(r["backend"], r["routing"]): r for r in data["backends"]}
    for routing in ("jagged", "uniform"):
        assert backends[("loop", routing)]["rel_diff"] == 0
        assert backends[("grouped_mm", routing)]["rel_diff"] < 1e-5 and backends[("grouped_mm", routing)]["ms"] > 0
        assert backends[("triton", routing)]["ms"] is None and backends[("triton", routing)]["note"]
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"moectl::attention", "moectl::experts", "moectl::router", "moectl::optimizer"} <= names


def test_profile_dense_model_and_bad_options(cli, tmp_path):
    result = cli("profile", "quickstart", *SMALL, "model.moe=null", "--steps", "1", "--warmup", "0")
    assert result.exit_code == 0, result.output
    assert "no MoE layers" in result.stdout and "Expert backends" not in result.stdout
    bad = cli("profile", "quickstart", "--precision", "fp16")
    assert bad.exit_code == 2 and "--precision fp16" in bad.stderr
    folder = cli("profile", "quickstart", "--json", tmp_path)
    assert folder.exit_code == 2 and "is a folder" in folder.stderr
    missing = cli("profile", "no-such-recipe")
    assert missing.exit_code == 2 and "Traceback" not in missing.output


def test_stage_labels_are_no_ops_outside_a_profile():
    assert isinstance(stages.record_stage("experts"), contextlib.nullcontext)
    with stages.profiling_stages():
        assert not isinstance(stages.record_stage("experts"), contextlib.nullcontext)
    assert isinstance(stages.record_stage("experts"), contextlib.nullcontext)


def test_kernel_shares_and_attribution_on_a_known_graph():
    """Forward ops inside a label and their backward nodes land in that label's stage."""
    from torch.profiler import profile, record_function

    from moectl.profile.attribution import attribute

    x = torch.randn(64, 64, requires_grad=True)
    w = torch.randn(64, 64, requires_grad=True)
    with stages.profiling_stages(), profile() as prof:
        with record_function("moectl.profile.step"):
            with stages.record_stage("experts"):
                y = x @ w
            with stages.record_stage("combine"):
                z = (y.relu() * 2).sum()
            z.backward()
    per_step, share, step_ms = attribute(prof.events(), torch.device("cpu"), 1)
    assert per_step["experts"][0] > 0 and per_step["experts"][1] > 0   # MmBackward0 belongs to experts
    assert per_step["combine"][0] > 0 and per_step["combine"][1] > 0
    assert share["matmul"] > 0 and step_ms > 0


def test_profile_takes_a_folder_weights_and_refuses_damaged_ones(cli, tmp_path):
    saved = tmp_path / "init"
    assert cli("build", "quickstart", *SMALL, "--save", saved).exit_code == 0
    result = cli("profile", saved, "--steps", "1", "--warmup", "0", "--no-backends",
                 "--json", tmp_path / "new" / "deeper" / "p.json")
    assert result.exit_code == 0, result.output
    assert f"weights from {saved}" in result.stdout.replace("\n", "")
    assert (tmp_path / "new" / "deeper" / "p.json").is_file()   # its folder was made first
    (saved / "model.safetensors").write_bytes(b"not a safetensors file")
    damaged = cli("profile", saved, "--steps", "1", "--warmup", "0", "--no-backends")
    assert damaged.exit_code == 2 and "cannot be used here" in damaged.stderr
    assert "moectl profile" in damaged.stderr and "Traceback" not in damaged.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((saved / "config.yaml").read_text())
    fresh = cli("profile", empty, "--steps", "1", "--warmup", "0", "--no-backends")
    assert fresh.exit_code == 0 and "holds no checkpoint" in fresh.stdout.replace("\n", "")


def test_profile_leaves_the_weights_as_they_were_and_json_has_no_nan(tmp_path):
    from moectl.factory import build_model
    from moectl.profile.run import run_profile, write_profile
    from moectl.recipe.load import load_recipe
    from moectl.train.optim import make_optimizer

    rec = load_recipe("quickstart", SMALL)
    model = build_model(rec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prof = run_profile(model, make_optimizer(model, rec.train), 2, torch.device("cpu"), False, steps=1, warmup=1,
                       backends=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    prof.backends = []
    prof.kernel_share["other"] = float("nan")
    write_profile(prof, tmp_path / "p.json")
    assert json.loads((tmp_path / "p.json").read_text())["kernel_share"]["other"] is None


def test_a_trace_the_profiler_could_not_write_is_an_error(tmp_path):
    from moectl.errors import MoectlError
    from moectl.profile.run import export_trace

    class Silent:   # torch.profiler only logs a failed export
        def export_chrome_trace(self, path):
            pass

    with pytest.raises(MoectlError, match="could not be written"):
        export_trace(Silent(), tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []


def test_out_of_memory_is_a_message(cli, monkeypatch):
    import moectl.profile.run

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 1099511627776 bytes.")

    monkeypatch.setattr(moectl.profile.run, "run_profile", no_memory)
    result = cli("profile", "quickstart", *SMALL)
    assert result.exit_code == 2 and "out of memory" in result.stderr and "--batch-size" in result.stderr
    assert "Traceback" not in result.output
