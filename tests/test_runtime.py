"""End to end: tiny plans on synthetic data, resume after SIGKILL, and bad input."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import monomod
from monomod.cli import cli
from monomod.compiler import ConvertOptions
from monomod.plan import Plan
from monomod.api import load_run, load_student
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.runtime.jobs import RunContext
from conftest import FAMILY_RUNS, copy_run
from plan_helpers import run_tiny, tiny_plan  # noqa: F401 - run_tiny, tiny_plan: other test modules import them here


@pytest.mark.slow
@pytest.mark.parametrize("student", FAMILY_RUNS)
def test_tiny_plan_end_to_end(finished_runs, student):
    run_dir = finished_runs(student)  # the session's one real run of this family (vit 2 trained, nac 3 teacher, moe 2 trained)
    report = json.loads((run_dir / "report.json").read_text())
    for model in ("teacher", "student", "baseline"):
        assert 0.0 <= report[model]["iid_acc"] <= 1.0 and 0.0 <= report[model]["ood_acc"] <= 1.0
    assert set(report["jobs"]) >= {"teacher", "m2mkd:0", "assemble", "finetune", "baseline"}
    assert all(info["seconds"] >= 0 for info in report["jobs"].values())
    assert "| m2mKD student (assembled + fine-tuned) |" in (run_dir / "report.md").read_text()
    assert (run_dir / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert '"student_hybrid_acc"' in (run_dir / "report.html").read_text()  # the explorer with the run's hybrids
    assert Plan.load(run_dir).to_yaml() == (run_dir / "plan.yaml").read_text()
    # The loaded student takes raw [0, 1] images and normalises them itself.
    deployed = load_student(run_dir)
    assert deployed.input_size == (3, 32, 32)
    images = torch.rand(5, *deployed.input_size)
    run = load_run(run_dir)
    ctx = RunContext(run_dir=run_dir, plan=run.plan)
    mean, std = torch.tensor(ctx.data.mean).view(1, -1, 1, 1), torch.tensor(ctx.data.std).view(1, -1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(deployed(images), deployed.student((images - mean) / std))
    assert all(run.status().values())


def test_m2mkd_job_changes_only_the_student_stage_and_its_stitches(tmp_path):
    plan = tiny_plan(student="nac", modules=3, steps=4)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher", "meta"])
    teacher_before = load_file(str(run_dir / "jobs/teacher/model.safetensors"))
    meta_before = load_file(str(run_dir / "jobs/meta/model.safetensors"))
    ctx = RunContext(run_dir=run_dir, plan=plan)
    fresh = ctx.stitched(ctx.new_student(plan.settings["seed"]), 1, "linear").state_dict()
    fresh = {k: v.clone() for k, v in fresh.items()}
    execute(plan, run_dir, only=["m2mkd:1"])
    ctx = RunContext(run_dir=run_dir, plan=plan)  # reload everything from disk
    for name, tensor in ctx.product("teacher").items():
        assert torch.equal(tensor, teacher_before[name]), name
    for name, tensor in ctx.product("meta").items():
        assert torch.equal(tensor, meta_before[name]), name
    distilled = ctx.product("m2mkd:1")
    assert set(distilled) == set(fresh)  # S_1 with its pre/post stitches, nothing else
    assert any(k.startswith("pre.") for k in distilled) and any(k.startswith("post.") for k in distilled)
    changed = {k for k in distilled if not torch.equal(distilled[k], fresh[k])}
    assert any(k.startswith("pre.") for k in changed) and any(k.startswith("stage.") for k in changed)


def test_rerun_skips_finished_jobs_and_edits_rerun_only_dependents(tmp_path, finished_runs):
    plan = tiny_plan()
    run_dir = copy_run(finished_runs("vit"), tmp_path / "run")  # tiny_plan() run for real
    assert {s.state for s in execute(plan, run_dir)} == {"cached"}
    edited = Plan.load(run_dir)
    edited.job("m2mkd:1").config["train"]["steps"] = 2
    edited.rehash()
    ran = {s.name for s in execute(edited, run_dir) if s.state == "done"}
    assert ran == {"m2mkd:1", "assemble", "finetune", "evaluate"}


class _RecordingSettings(dict):
    """Run settings that remember which keys a job read."""

    def __init__(self, settings):
        super().__init__(settings)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)


@pytest.mark.slow
@pytest.mark.parametrize("student, modules, upcycle", [("nac", 3, False), ("moe", 2, True)])
def test_every_job_reads_only_the_settings_its_hash_covers(tmp_path, student, modules, upcycle):
    """A job reading a setting outside its JobKind.settings would be reused after that setting changed: forbid it."""
    from monomod.plan import JOB_KINDS, UNHASHED_SETTINGS
    from monomod.runtime.jobs import run_job

    width = {"embed_dim": 192, "num_heads": 3} if upcycle else {}  # upcycled experts need vit_tiny's shapes
    plan = tiny_plan(student=student, modules=modules, upcycle=upcycle, steps=2, student_overrides=width)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    for job in plan.jobs:
        settings = _RecordingSettings(plan.settings)
        view = Plan(settings=settings, jobs=plan.jobs)
        settings.read.clear()  # hashing the plan read every scope
        run_job(RunContext(run_dir=run_dir, plan=view), job)  # a fresh context: nothing cached from other jobs
        scope = JOB_KINDS[job.kind].settings
        if scope is not None:
            allowed = {*scope, *UNHASHED_SETTINGS}  # how a job runs (threads), not what it computes
            assert settings.read <= allowed, (job.name, sorted(settings.read - allowed))


def test_reuse_copies_finished_jobs_with_the_same_hash(tmp_path, stub_runners):
    from monomod.runtime.execute import reuse_finished

    first = prepare_run_dir(tiny_plan(student="nac", modules=3), tmp_path / "nac")
    execute(Plan.load(first), first, only=["teacher", "meta"])
    plan = tiny_plan(student="vit", modules=3)
    run_dir = prepare_run_dir(plan, tmp_path / "vit")
    (run_dir / "jobs" / "teacher").mkdir(parents=True)  # a stale unfinished attempt is replaced
    (run_dir / "jobs" / "teacher" / "log.txt").write_text("killed")
    assert reuse_finished(plan, run_dir, [first]) == ["teacher", "meta"]
    assert (run_dir / "jobs/teacher/model.safetensors").read_bytes() == (first / "jobs/teacher/model.safetensors").read_bytes()
    assert not (run_dir / "jobs/teacher/checkpoint").exists() and "killed" not in (run_dir / "jobs/teacher/log.txt").read_text()
    statuses = {s.name: s.state for s in execute(plan, run_dir)}
    assert statuses["teacher"] == statuses["meta"] == "cached" and statuses["m2mkd:0"] == "done"
    assert reuse_finished(plan, run_dir, [first]) == []  # nothing left to reuse
    with pytest.raises(monomod.MonomodError, match="is not a monomod run"):
        reuse_finished(plan, run_dir, [tmp_path])


def test_a_different_plan_is_refused_unless_forced(tmp_path):
    plan = tiny_plan()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    other = tiny_plan(alpha=0.9)
    with pytest.raises(monomod.MonomodError, match="holds a different plan.*m2mkd:0"):
        prepare_run_dir(other, run_dir)
    prepare_run_dir(other, run_dir, force=True)
    assert Plan.load(run_dir).job("m2mkd:0").config["loss"]["alpha"] == 0.9
    prepare_run_dir(other, run_dir)  # the same plan again is a resume, not a conflict


def test_nan_loss_stops_the_job_and_keeps_finished_ones(tmp_path):
    plan = tiny_plan()
    plan.job("meta").config["train"]["lr"] = 1e30
    plan.job("meta").config["train"]["grad_clip"] = None
    plan.rehash()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    with pytest.raises(monomod.MonomodError, match="job 'meta' failed.*(nan|inf|finite)"):
        execute(plan, run_dir)
    assert (run_dir / "jobs/teacher/done.json").is_file()
    assert [s.state for s in execute(plan, run_dir, only=["teacher"])] == ["cached"]


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, f"timed out waiting for {path}"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_same_result(tmp_path):
    plan = tiny_plan(steps=40)
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"]["checkpoint_every"] = 5
    plan.rehash()
    reference = prepare_run_dir(plan, tmp_path / "reference")
    execute(plan, reference)
    killed = prepare_run_dir(plan, tmp_path / "killed")
    # Same thread count as this process: float reductions, and so the weights, depend on it.
    proc = subprocess.Popen([sys.executable, "-m", "monomod.cli", "run", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(killed / "jobs/m2mkd-0/checkpoint", proc)  # mid-way through the first m2mKD job
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "report.json").exists()
    result = CliRunner().invoke(cli, ["run", str(killed)])
    assert result.exit_code == 0, result.output
    for job in ("m2mkd:0", "m2mkd:1", "finetune", "baseline"):
        ours = load_file(str(killed / "jobs" / job.replace(":", "-") / "model.safetensors"))
        theirs = load_file(str(reference / "jobs" / job.replace(":", "-") / "model.safetensors"))
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), job
    ours, theirs = (json.loads((d / "report.json").read_text()) for d in (killed, reference))
    assert {k: ours[k] for k in ("teacher", "student", "baseline")} == {k: theirs[k] for k in ("teacher", "student", "baseline")}


def test_convert_cli_dry_run_and_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["convert", "vit_tiny", "--to", "nac", "-k", "4", "--dry-run", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert [j["name"] for j in json.loads(result.output)["jobs"]][:3] == ["meta", "incubate:0", "incubate:1"]
    cases = [
        (["vit_tiny", "--to", "nac", "-k", "2"], "needs at least 3 modules"),
        (["vit_tiny", "--to", "cnn", "-k", "4"], "unknown student --to 'cnn'"),
        (["vit_tiny", "--to", "vit", "-k", "2", "--data", f"imagefolder:{tmp_path}/missing"], "does not exist"),
    ]
    empty = tmp_path / "empty"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "val" / "cat").mkdir(parents=True)
    cases.append((["vit_tiny", "--to", "vit", "-k", "2", "--data", f"imagefolder:{empty}"], "no images"))
    cases += [
        (["vit_tiny", "--to", "moe", "-k", "2", "--upcycle"], "--upcycle found no teacher MLP with the experts' shapes"),
        (["vit_tiny", "--to", "nac", "-k", "3", "--upcycle"], "a nac student has none"),
        (["vit_tiny", "--to", "nac", "-k", "3", "--feature-loss", "1"], "--feature-loss needs the student's boundaries"),
        (["vit_tiny", "--to", "moe", "-k", "2", "--set", "alpah=1"], "unknown key 'alpah'"),
        (["vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--reuse", str(empty)], "is not a monomod run"),
    ]
    for args, message in cases:
        result = runner.invoke(cli, ["convert", *args, "--out", str(tmp_path / "out")])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    # --set without a recipe sets any option: here the width that makes upcycling possible
    upcycled = runner.invoke(cli, ["convert", "vit_tiny", "--to", "moe", "-k", "2", "--upcycle", "--dry-run",
                                   "--m2mkd", "separate", "--format", "json", "--set", "student_overrides.embed_dim=192",
                                   "--set", "student_overrides.num_heads=3", "--set", "alpha=0.7"])
    assert upcycled.exit_code == 0, upcycled.output
    planned = json.loads(upcycled.output)
    assert planned["settings"]["student_overrides"] == {"embed_dim": 192, "num_heads": 3, "patch_size": 16}
    m2mkd = next(j for j in planned["jobs"] if j["name"] == "m2mkd:0")
    assert m2mkd["config"]["loss"]["alpha"] == 0.7 and m2mkd["config"]["upcycle"] is True
    assert "teacher" in m2mkd["inputs"]  # upcycling reads the teacher's MLPs
    plan_dir = tmp_path / "planned"
    prepare_run_dir(tiny_plan(), plan_dir)
    result = runner.invoke(cli, ["convert", "vit_tiny", "--to", "vit", "-k", "3", "--data", "synthetic", "--out", str(plan_dir)])
    assert result.exit_code == 2 and "holds a different plan" in result.output
    shown = runner.invoke(cli, ["plan", "show", str(plan_dir)])
    assert shown.exit_code == 0 and "m2mkd:1" in shown.output and "pending" in shown.output
    assert runner.invoke(cli, ["run", str(tmp_path / "nowhere")]).exit_code == 2


def test_teacher_module_loads_only_its_own_weights(tmp_path):
    plan = tiny_plan(modules=3)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher"])
    ctx = RunContext(run_dir=run_dir, plan=plan)
    full = monomod.extract(ctx.partition("cpu"))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        for i in range(3):
            lean = ctx.teacher_module(i)
            assert sum(p.numel() for p in lean.parameters()) == sum(p.numel() for p in full[i].parameters())
            assert not any(p.requires_grad for p in lean.parameters())
            y, x = lean(x), full[i](x)
            torch.testing.assert_close(y, x, rtol=0, atol=0)
    assert ctx.partition("meta").to_json() == ctx.partition("cpu").to_json()


def test_every_job_kind_has_one_runner():
    from monomod.plan import JOB_KINDS
    from monomod.runtime.jobs import RUNNERS

    assert set(RUNNERS) == set(JOB_KINDS)


def test_ood_accuracy_is_split_by_corruption_in_the_report():
    from monomod.report import run_report_markdown
    from monomod.runtime.jobs import ood_accuracies

    correct = torch.tensor([True, False, True, True, False, False])
    result = ood_accuracies(correct, ["blur", "blur", "noise", "noise", "noise", "shift"])
    assert result["ood_acc"] == pytest.approx(0.5)
    assert result["ood_by_corruption"] == pytest.approx({"blur": 0.5, "noise": 2 / 3, "shift": 0.0})
    assert "ood_by_corruption" not in ood_accuracies(correct, None)  # an image folder names no corruptions
    settings = {"teacher": "vit_tiny", "student": "nac", "modules": 2, "data": "digits", "img_size": 32,
                "preset": "demo", "meta": "trained", "seed": 0}
    report = {"student": {"iid_acc": 0.9, **result}, "baseline": {"iid_acc": 0.8, "ood_acc": 0.4},
              "jobs": {}, "total_seconds": 0.0, "settings": settings}
    text = run_report_markdown(report, curves=None)
    assert "| OOD corruption |" in text and "| noise | 66.7% |" in text
