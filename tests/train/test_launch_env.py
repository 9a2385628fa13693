"""SLURM's variables mapped to a process group's (no processes started)."""

from __future__ import annotations

import pytest

from moectl.errors import MoectlError
from moectl.train.parallel import first_host, slurm_variables

STEP = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_ID": "12345"}


@pytest.mark.parametrize(("nodelist", "host"), [("gpu-[003-005,007],cpu1", "gpu-003"), ("a,b", "a"),
                                                ("node[01-04]", "node01"), ("single", "single"), ("[", None)])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_a_multi_task_step_is_mapped():
    env = slurm_variables({**STEP, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "n[7-8]"})
    assert env == {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "n7", "MASTER_PORT": "22345"}
    env = slurm_variables({**STEP, "SLURM_STEP_NUM_NODES": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234"})
    assert "MASTER_ADDR" not in env and "MASTER_PORT" not in env and env["WORLD_SIZE"] == "4"


@pytest.mark.parametrize("env", [
    {},                                                         # no SLURM at all
    {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"},                 # the batch script itself (no srun step)
    {**STEP, "SLURM_STEP_NUM_TASKS": "1"},                      # srun -n 1
    {**STEP, "WORLD_SIZE": "4"},                                # srun torchrun: torchrun's variables win
])
def test_nothing_to_map(env):
    assert slurm_variables(env) == {}


def test_no_meeting_place_is_refused():
    with pytest.raises(MoectlError, match="MASTER_ADDR"):
        slurm_variables({**STEP, "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": ""})
