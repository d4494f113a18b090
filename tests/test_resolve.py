"""Decided on the machine that runs: a plan records what was asked (``auto`` precision, no thread count), each job
resolves it where it runs and records what it used, and the process executor never gives jobs side by side more
threads than the cores they share."""
import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from monomod.cli import cli
from monomod.runtime import executors
from monomod.runtime.config import resolve_precision
from monomod.runtime.execute import prepare_run_dir
from test_runtime import tiny_plan

# A child process that reports native bf16 (as a GPU node or an AMX CPU does), runs one job of RUN_DIR as every
# executor does (``run_one``), and says which precision the training loop used.
_CHILD = """
import json, sys, torch
torch.ops.mkldnn._is_mkldnn_bf16_supported = lambda: True  # this process's hardware computes bf16 natively
from monomod.runtime import train
seen = []
init = train._Stepper.__init__
def spy(self, *args, **kwargs):
    init(self, *args, **kwargs)
    seen.append(self.use_amp)
train._Stepper.__init__ = spy
from monomod.runtime.executors import run_one
result = run_one(sys.argv[1], "meta", threads=1)
print(json.dumps({"result": result, "bf16_autocast": seen}))
"""


def _cpu_without_bf16(monkeypatch) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.slow
def test_auto_precision_is_resolved_by_the_process_that_runs_the_job(tmp_path, monkeypatch):
    _cpu_without_bf16(monkeypatch)  # compiled on a CPU-only login node: it would have resolved auto to fp32
    assert resolve_precision("auto") == "fp32"
    plan = tiny_plan(precision="auto")
    assert {job.config["train"]["precision"] for job in plan.jobs if "train" in job.config} == {"auto"}
    assert plan.settings["threads"] is None
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.run([sys.executable, "-c", _CHILD, str(run_dir)], capture_output=True, text=True, env=env,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    report = json.loads(child.stdout.strip().splitlines()[-1])
    assert report["result"]["ok"], report
    assert report["bf16_autocast"] == [True]  # the training loop ran under bf16 autocast there
    done = json.loads((run_dir / "jobs/meta/done.json").read_text())
    assert done["used"] == {"threads": 1, "device": "cpu", "precision": "bf16", "input_path": "cpu"}
    shown = json.loads(CliRunner().invoke(cli, ["plan", "show", str(run_dir), "--format", "json"]).output)
    meta = next(job for job in shown["jobs"] if job["name"] == "meta")
    assert meta["config"]["train"]["precision"] == "auto" and meta["used"]["precision"] == "bf16"  # asked, used
    table = CliRunner().invoke(cli, ["plan", "show", str(run_dir)]).output
    assert "threads auto, precision auto" in table  # what the plan asks; the table's `used` column, what ran


def test_the_input_path_a_job_records_is_resolved_for_its_device_and_data():
    from monomod.runtime.device_data import resolve_input_path

    assert resolve_input_path("auto", "digits", device="cuda") == "device"
    assert resolve_input_path("auto", "digits", device="cpu") == "cpu"
    assert resolve_input_path("auto", "imagefolder:/data/x", device="cuda") == "cpu"  # until measured on a GPU
    assert resolve_input_path("auto", "digits", "imagefolder:/data/x", device="cuda") == "cpu"
    assert resolve_input_path("cached", "digits", device="cpu") == "device"  # an in-memory set is one already
    assert resolve_input_path("cached", "imagefolder:/data/x", device="cpu") == "cached"
    assert resolve_input_path("device", "imagefolder:/data/x", device="cpu") == "device"


class _Plan:
    settings: dict = {"threads": None}


@pytest.mark.parametrize("cores, workers, ready, expected", [
    (2, 2, 1, [2]),        # a chain: the one ready job gets every core
    (2, 2, 4, [1, 1]),     # side by side: a core each
    (3, 2, 2, [2, 1]),     # the odd core goes to the first (longest path) job
    (1, 2, 2, [1]),        # one core: one job at a time, never two threads on it
    (8, 3, 5, [3, 3, 2]),
])
def test_process_workers_share_the_cores_without_threads(monkeypatch, tmp_path, cores, workers, ready, expected):
    monkeypatch.setattr(executors, "cpu_count", lambda: cores)
    pool = executors.ProcessExecutor(tmp_path, workers, plan=_Plan())
    assert pool.allot(ready) == expected
    assert sum(expected) <= cores


def test_a_running_job_keeps_its_cores_until_it_finishes(monkeypatch, tmp_path):
    monkeypatch.setattr(executors, "cpu_count", lambda: 2)
    pool = executors.ProcessExecutor(tmp_path, 2, plan=_Plan())
    pool.threads_of["meta"] = 2  # started alone, with both cores
    assert pool.allot(3) == []  # nothing else starts beside it: its cores are taken
    pool.threads_of["meta"] = 1
    assert pool.allot(3) == [1]
    given = type("Given", (), {"settings": {"threads": 3}})()
    assert executors.ProcessExecutor(tmp_path, 2, plan=given).allot(5) == [3, 3]  # asked for: used as asked
