"""The reproducibility record: git state, launcher, and the comparison of records."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from moectl import provenance


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_names_the_commit_and_uncommitted_changes(tmp_path):
    assert provenance.git_state(tmp_path) == (None, None)
    env = ["-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "recipe.yaml").write_text("a: 1\n")
    subprocess.run(["git", *env, "-C", str(tmp_path), "add", "."], check=True)
    subprocess.run(["git", *env, "-C", str(tmp_path), "commit", "-qm", "x"], check=True)
    commit, dirty = provenance.git_state(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "recipe.yaml").write_text("a: 2\n")
    assert provenance.git_state(tmp_path) == (commit, True)


def test_launcher_is_read_from_the_environment(monkeypatch):
    for key in ("MOECTL_WORKER", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    assert provenance.launcher() == "direct"
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert provenance.launcher() == "slurm"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert provenance.launcher() == "torchrun"
    monkeypatch.setenv("MOECTL_WORKER", "1")
    assert provenance.launcher() == "moectl --nproc"


def test_differences_list_each_field_that_is_not_the_same():
    a = {"torch": "2.13.0", "threads": 1, "cpu": "x"}
    b = {"torch": "2.11.0", "threads": 1, "cpu": "x"}
    assert provenance.differences({"a": a, "b": dict(a)}) == []
    assert provenance.differences({"a": a, "b": b, "old": None}) == ["torch: 2.13.0 (a), 2.11.0 (b)"]
    record = provenance.record(world_size=2)
    assert record["world_size"] == 2 and set(provenance.COMPARED) <= set(record)
