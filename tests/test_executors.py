"""Executors (local, process pool, Ray), failures and retries, the live job board, and torchrun inside a job."""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from rich.console import Console
from safetensors.torch import load_file

import monomod
from monomod.cli import cli
from monomod.errors import JobFailed
from monomod.runtime.execute import JobBoard, execute, prepare_run_dir
from monomod.runtime.executors import Outcome
from plan_helpers import tiny_plan

MODELS = ("teacher", "meta", "m2mkd-0", "m2mkd-1", "assemble", "finetune", "baseline")
RESULTS = ("teacher", "meta", "assembled", "student", "baseline")


def _weights(run_dir: Path, job: str) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "jobs" / job / "model.safetensors"))


def _assert_same_run(ours: Path, reference: Path) -> None:
    """Bitwise the same products and report: a plan that asks for a thread count (settings.threads) computes every
    job with it, whichever executor runs it."""
    mine, theirs = (json.loads((d / "report.json").read_text()) for d in (ours, reference))
    assert {k: mine[k] for k in RESULTS} == {k: theirs[k] for k in RESULTS}
    products = sorted(p.relative_to(reference) for p in reference.glob("jobs/*/model.safetensors"))
    assert [p.parent.name for p in products] == sorted(MODELS)
    for product in products:
        a, b = load_file(str(ours / product)), load_file(str(reference / product))
        assert a.keys() == b.keys(), product
        unequal = [key for key in b if not torch.equal(a[key], b[key])]
        assert not unequal, f"{product}: {unequal[:3]}"


@pytest.fixture(scope="module")
def local_run(finished_runs) -> Path:
    return finished_runs("vit")  # tiny_plan(threads=1) run for real by the local executor, shared with test_runtime


@pytest.mark.slow
def test_process_pool_agrees_with_local_and_logs_each_job(tmp_path, local_run):
    plan = tiny_plan(threads=1)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    text = io.StringIO()
    statuses = execute(plan, run_dir, executor="process", workers=2, console=Console(file=text, width=200))
    assert [s.state for s in statuses] == ["done"] * len(plan.jobs)
    _assert_same_run(run_dir, local_run)
    lines = text.getvalue().splitlines()  # not a terminal: one calm line per start and finish, no live view
    assert any(line.startswith("▶ m2mkd:1 on pid ") for line in lines), lines
    assert any(line.startswith("✓ m2mkd:1 in ") for line in lines), lines
    assert len(lines) == 2 * len(plan.jobs)
    log = (run_dir / "jobs/m2mkd-1/log.txt").read_text()
    assert "m2mkd:1: started on" in log and f"with {plan.settings['threads']} thread(s)" in log and "m2mkd:1: finished" in log
    worker = json.loads((run_dir / "jobs/m2mkd-1/worker.json").read_text())
    assert worker["pid"] != os.getpid() and worker["threads"] == plan.settings["threads"]
    pids = {json.loads((run_dir / "jobs" / job.dir / "worker.json").read_text())["pid"] for job in plan.jobs}
    assert len(pids) <= 2  # two worker processes, each reused for job after job


@pytest.mark.slow
def test_ray_agrees_with_local(tmp_path, local_run):
    ray = pytest.importorskip("ray")
    plan = tiny_plan(threads=1)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        statuses = execute(plan, run_dir, executor="ray", console=Console(file=io.StringIO()))
    finally:
        ray.shutdown()
    assert [s.state for s in statuses] == ["done"] * len(plan.jobs)
    _assert_same_run(run_dir, local_run)
    assert json.loads((run_dir / "jobs/m2mkd-0/worker.json").read_text())["threads"] == plan.settings["threads"]


def test_ray_missing_is_one_line_error(tmp_path, monkeypatch):
    run_dir = prepare_run_dir(tiny_plan(), tmp_path / "run")
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    result = CliRunner().invoke(cli, ["run", str(run_dir), "--executor", "ray"])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        "error: --executor ray needs Ray, which is not installed; pip install 'monomod[ray]'"]
    assert not (run_dir / "jobs").exists()  # nothing ran


def test_bad_executor_options(tmp_path):
    plan = tiny_plan()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    runner = CliRunner()
    result = runner.invoke(cli, ["run", str(run_dir), "--workers", "2"])
    assert result.exit_code == 2 and "--executor process" in result.output
    assert runner.invoke(cli, ["run", str(run_dir), "--executor", "process", "--workers", "0"]).exit_code == 2
    assert runner.invoke(cli, ["run", str(run_dir), "--max-retries", "-1"]).exit_code == 2
    edited = tiny_plan(alpha=0.9)  # workers read RUN_DIR/plan.yaml: executing another plan is refused
    with pytest.raises(monomod.MonomodError, match="not the plan being executed"):
        execute(edited, run_dir, executor="process")


def test_max_retries_then_one_line_failure_with_exit_code_1(tmp_path):
    plan = tiny_plan()
    plan.job("meta").config["train"].update(lr=1e30, grad_clip=None)  # fails at its first step, every time
    plan.rehash()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    result = CliRunner().invoke(cli, ["run", str(run_dir), "--max-retries", "2", "--job", "teacher", "--job", "meta"])
    assert result.exit_code == 1, result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "job 'meta' failed after 3 attempts: training job 'meta' hit a non-finite loss" in error[0]
    assert f"(log: {run_dir}/jobs/meta/log.txt)" in error[0] and f"`monomod run {run_dir}`" in error[0]
    log = (run_dir / "jobs/meta/log.txt").read_text()
    assert log.count("meta: started") == 3 and log.count("meta: failed") == 3 and "Traceback" in log
    assert (run_dir / "jobs/teacher/done.json").is_file() and not (run_dir / "jobs/meta/done.json").exists()
    with pytest.raises(JobFailed):  # the Python API raises the same error
        execute(plan, run_dir)


def test_job_board_live_rows_and_calm_lines(tmp_path):
    plan = tiny_plan()
    job = plan.job("m2mkd:0")
    metrics = tmp_path / "jobs" / job.dir / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text(json.dumps({"step": 2, "loss": 0.4321}) + "\n" + '{"step": 3, "lo')  # torn last line
    live = io.StringIO()
    board = JobBoard(plan, tmp_path, Console(file=live, force_terminal=True, width=150), live=True)
    with board:
        board.started(job, 1, "pid 4242")
        board.refresh({job.name: "pid 4242"})
        board.progress.refresh()
        assert board.progress.tasks[0].completed == 2
        board.finished(job, Outcome(job.name, True, seconds=1.5, worker="pid 4242"))
    screen = live.getvalue()
    assert "2/3" in screen and "loss 0.4321" in screen and "pid 4242" in screen and "✓ m2mkd:0" in screen
    calm = io.StringIO()
    board = JobBoard(plan, tmp_path, Console(file=calm, width=200), live=False)
    with board:
        board.started(job, 2, "10.0.0.7 pid 17")
        board.failed(job, Outcome(job.name, False, error="boom", worker="10.0.0.7 pid 17"), retry="1/2")
    assert calm.getvalue().splitlines() == [
        "▶ m2mkd:0 (attempt 2) on 10.0.0.7 pid 17",
        f"✗ m2mkd:0 failed: boom (log: {tmp_path}/jobs/m2mkd-0/log.txt), retrying (1/2)"]


def _checkpoint_step(job_dir: Path) -> int:
    try:
        return json.loads((job_dir / "checkpoint" / "state.json").read_text())["step"]
    except (OSError, ValueError, KeyError):
        return 0


def _kill_worker_after(job_dir: Path, proc: subprocess.Popen, *, attempt: int, step: int) -> int:
    """SIGKILL the pool worker running ``job_dir``'s job (its ``attempt``-th start) once its checkpoint is past
    ``step``; returns the checkpointed step it was killed after."""
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, "the run ended before its worker could be killed"
        assert time.time() < deadline, f"timed out waiting for {job_dir} to pass step {step}"
        log = job_dir / "log.txt"
        started = log.read_text().count(": started on") if log.exists() else 0
        reached = _checkpoint_step(job_dir)
        if started == attempt and reached > step:
            pid = json.loads((job_dir / "worker.json").read_text())["pid"]
            assert pid != proc.pid
            os.kill(pid, signal.SIGKILL)
            return reached
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_worker_is_reported_then_run_resumes_and_retries(tmp_path):
    plan = tiny_plan()
    for name in ("m2mkd:0", "m2mkd:1"):
        plan.job(name).config["train"].update(steps=60, checkpoint_every=5)
    plan.rehash()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher", "meta"])
    job_dir = run_dir / "jobs/m2mkd-0"
    command = [sys.executable, "-m", "monomod.cli", "run", str(run_dir), "--executor", "process", "--workers", "2"]

    # 1. A worker killed mid-job: reported by name and log, exit 1; the other m2mKD job still finishes.
    proc = subprocess.Popen(command + ["--job", "m2mkd:0", "--job", "m2mkd:1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed_at = _kill_worker_after(job_dir, proc, attempt=1, step=0)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stderr
    error = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "job 'm2mkd:0' failed: worker pid" in error[0] and "killed by SIGKILL" in error[0]
    assert f"(log: {run_dir}/jobs/m2mkd-0/log.txt)" in error[0]
    assert (run_dir / "jobs/m2mkd-1/done.json").is_file() and not (job_dir / "done.json").exists()

    # 2. `monomod run` again, with a retry: the job resumes from its checkpoint, is killed once more and retried,
    #    and the whole plan finishes. Finished jobs are not run again.
    proc = subprocess.Popen(command + ["--max-retries", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _kill_worker_after(job_dir, proc, attempt=2, step=killed_at)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "✗ m2mkd:0 failed" in stderr and "retrying (1/1)" in stderr and "▶ m2mkd:0 (attempt 2)" in stderr
    assert "▶ m2mkd:1" not in stderr and "▶ teacher" not in stderr
    assert json.loads((job_dir / "result.json").read_text())["resumed_from"] > killed_at
    assert (job_dir / "log.txt").read_text().count(": started on") == 3
    assert json.loads((run_dir / "report.json").read_text())["student"]["iid_acc"] is not None


@pytest.mark.slow
def test_torchrun_data_parallel_matches_single_process(tmp_path):
    # boundary_loss=0: the boundary loss normalises by its batch's mean square, which each rank takes over its shard
    plan = tiny_plan(steps=8, boundary_loss=0)
    single = prepare_run_dir(plan, tmp_path / "single")
    execute(plan, single, only=["teacher", "meta"])
    parallel = tmp_path / "parallel"
    shutil.copytree(single, parallel)
    execute(plan, single, only=["m2mkd:0"])
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "monomod.cli", "run", str(parallel), "--job", "m2mkd:0"],
        capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("1 job(s) ran") == 1  # only rank 0 talks
    done = json.loads((parallel / "jobs/m2mkd-0/done.json").read_text())
    assert done["world_size"] == 2
    ours, theirs = _weights(parallel, "m2mkd-0"), _weights(single, "m2mkd-0")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-4, msg=key)
    losses = [[json.loads(line)["loss"] for line in (d / "jobs/m2mkd-0/metrics.jsonl").read_text().splitlines()]
              for d in (parallel, single)]
    assert len(losses[0]) == len(losses[1]) and all(abs(a - b) < 1e-4 for a, b in zip(*losses))
