"""Issues 15 and 27: a RUN_DIR that cannot be escaped, locked, checkpointed mid-job, verified, and safe to open
when someone else sent it; bad input (hostile YAML, paths, sizes, data) refused before work in one line.

One section per numbered item of issue 15, then one per group of issue 27; tests/BAD_INPUTS.md lists the inputs and
their one-line messages.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from monomod.cli import cli
from monomod.errors import MonomodError, shorten
from monomod.compiler import ConvertOptions
from monomod.plan import Plan
from monomod.api import load_student
from monomod.compiler import compile_options, set_checkpointing
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.rundir import RunDir
from monomod.runtime.jobs import RunContext
from monomod.runtime.lock import LOCK_FILE, run_dir_lock
from monomod.runtime.config import TrainConfig
from monomod.runtime.train import train

TRUSTED_FACTORY = "timm.models.vision_transformer:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def plan_dict() -> dict:
    options = ConvertOptions(teacher="vit_tiny", student="vit", modules=2, data="synthetic", img_size=32,
                             teacher_training="end-to-end", m2mkd="separate")  # its tests run m2mkd:0 alone
    plan = compile_options(options)
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=2, batch_size=16, warmup_steps=0)
    plan.rehash()
    return plan.to_dict()


def _plan(plan_dict: dict) -> Plan:
    return Plan.from_dict(json.loads(json.dumps(plan_dict)))


def _cli(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def _write_plan(run_dir: Path, data: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


# ------------------------------------------------------------------------------ 1. job names and paths stay inside


@pytest.mark.parametrize("name, outputs, message", [
    ("../../x", None, "is not"),
    ("/abs/path", None, "is not"),
    ("teacher:../x", None, "is not"),
    ("meta", None, "is not 'teacher'"),  # a name of another kind
    ("teacher", ["../../outside.safetensors"], "outside RUN_DIR"),
    ("teacher", ["/tmp/abs.safetensors"], "outside RUN_DIR"),
])
def test_job_names_and_outputs_cannot_escape_the_run_dir(plan_dict, tmp_path, name, outputs, message):
    data = json.loads(json.dumps(plan_dict))
    data["jobs"][0]["name"] = name
    if outputs is not None:
        data["jobs"][0]["outputs"] = outputs
    with pytest.raises(MonomodError, match=message):
        Plan.from_dict(data)
    run_dir = tmp_path / "deep" / "run"
    _write_plan(run_dir, data)
    line = _one_line_error(_cli("run", run_dir))
    assert message in line
    assert sorted(p.name for p in run_dir.iterdir()) == ["plan.yaml"]  # nothing ran, nothing written
    assert sorted(p.name for p in (tmp_path / "deep").iterdir()) == ["run"]


def test_the_job_name_pattern_follows_job_kinds(monkeypatch, plan_dict):
    import monomod.plan as plan_module

    monkeypatch.setattr(plan_module, "JOB_KINDS", (*plan_module.JOB_KINDS, "incubate"))
    assert plan_module.job_name_pattern().fullmatch("incubate:3")
    assert not plan_module.job_name_pattern().fullmatch("incubate:-1")


def test_a_symbolic_link_out_of_the_run_dir_is_refused(plan_dict, tmp_path):
    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    (run_dir / "jobs").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (run_dir / "jobs" / "teacher").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(MonomodError, match="outside"):
        execute(plan, run_dir)
    assert not any((tmp_path / "elsewhere").iterdir())


# ----------------------------------------------------------------------------------------------- 2. --trust-code


def test_code_named_by_a_recipe_runs_only_with_trust_code(tmp_path):
    recipe = tmp_path / "factory.yaml"
    recipe.write_text(f"description: a factory teacher\nteacher: '{TRUSTED_FACTORY}'\nstudent: vit\nmodules: 2\n"
                      "data: synthetic\nimg_size: 32\n")
    line = _one_line_error(_cli("convert", "--recipe", recipe, "--dry-run"))
    assert "names Python code as its teacher" in line and "--trust-code" in line
    assert _cli("convert", "--recipe", recipe, "--dry-run", "--trust-code").exit_code == 0
    # typed on the command line, it is the user's own choice
    assert _cli("convert", TRUSTED_FACTORY, "--to", "vit", "-k", "2", "--data", "synthetic", "--img-size", "32",
                "--dry-run").exit_code == 0


def test_code_named_by_a_plan_file_runs_only_with_trust_code(plan_dict, tmp_path):
    data = json.loads(json.dumps(plan_dict))
    data["settings"]["teacher"] = "os:system"
    run_dir = tmp_path / "run"
    _write_plan(run_dir, data)
    line = _one_line_error(_cli("run", run_dir))
    assert "plan.yaml names Python code as its teacher ('os:system')" in line and "--trust-code" in line
    from monomod.api import run

    with pytest.raises(MonomodError, match="trust_code=True"):
        run(run_dir)


# ------------------------------------------------------------------------------------------------- 3. the lock


def test_a_second_process_is_refused_and_a_stale_lock_does_not_block(plan_dict, tmp_path):
    run_dir = tmp_path / "run"
    _write_plan(run_dir, plan_dict)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run_dir / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        line = _one_line_error(_cli("run", run_dir))
        assert f"is in use by pid {holder.pid} on {socket.gethostname()}" in line
        assert "error" in _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic",
                                                "--img-size", "32", "--out", run_dir))
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(run_dir):  # the holder is dead: its lock is stale
        assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
        with run_dir_lock(run_dir):  # re-entrant in one process (convert holds it around execute)
            pass
        assert (run_dir / LOCK_FILE).exists()
    assert not (run_dir / LOCK_FILE).exists()


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with run_dir_lock(tmp_path):
        assert not (tmp_path / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------- 4. checkpoints during a job


class _Boom(Exception):
    pass


def _interrupted_training(tmp_path: Path, fail_at: int | None, **config) -> object:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    calls = {"n": 0}

    def loss_fn(x, y):
        calls["n"] += 1
        if fail_at is not None and calls["n"] == fail_at:
            raise _Boom("killed mid-job")
        logits = model(x)
        return nn.functional.cross_entropy(logits, y), logits

    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(4)]
    return train(model, loss_fn, lambda epoch: iter(data), TrainConfig(steps=12, log_every=1, **config),
                 job_dir=tmp_path / "job")


@pytest.mark.parametrize("config, resumed", [({"checkpoint_every": 5, "checkpoint_minutes": 0}, 5),
                                             ({"checkpoint_minutes": 1e-9}, 7)])
def test_a_job_interrupted_mid_way_resumes_from_its_checkpoint(tmp_path, config, resumed):
    assert TrainConfig(steps=1).checkpoint_minutes == 10  # by default: every 10 minutes, and at the end
    with pytest.raises(_Boom):
        _interrupted_training(tmp_path, fail_at=8, **config)  # dies in step 8
    result = _interrupted_training(tmp_path, fail_at=None, **config)
    assert result.resumed_from == resumed and result.steps == 12


def test_checkpoint_settings_do_not_enter_job_hashes(plan_dict, tmp_path):
    plan = _plan(plan_dict)
    before = [job.hash for job in plan.jobs]
    assert set_checkpointing(plan, 7, 2.5)
    assert [job.hash for job in plan.jobs] == before
    assert plan.job("m2mkd:0").config["train"]["checkpoint_every"] == 7
    dry = _cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--img-size", "32",
               "--dry-run", "--format", "json", "--checkpoint-every", "3", "--checkpoint-minutes", "1")
    assert dry.exit_code == 0, dry.output
    assert json.loads(dry.output)["jobs"][0]["config"]["train"]["checkpoint_minutes"] == 1


# ------------------------------------------------------------------------------ 5. products verified when read


def test_a_truncated_product_is_not_done_and_runs_again_with_its_dependents(plan_dict, tmp_path, stub_runners):
    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher", "meta", "m2mkd:0"])
    record = json.loads((run_dir / "jobs/teacher/done.json").read_text())
    product = run_dir / "jobs/teacher/model.safetensors"
    assert record["products"]["jobs/teacher/model.safetensors"]["size"] == product.stat().st_size
    product.write_bytes(product.read_bytes()[:1000])  # truncated
    assert not RunDir(run_dir).is_done(plan.job("teacher"))
    assert "model.safetensors has 1000 bytes" in RunDir(run_dir).done_problem(plan.job("teacher"))
    with pytest.raises(MonomodError, match="teacher/model.safetensors has 1000 bytes"):
        RunContext(run_dir=run_dir, plan=plan).product("teacher")
    shown = _cli("plan", "show", run_dir, "--format", "json")
    teacher = json.loads(shown.output)["jobs"][0]
    assert teacher["done"] is False and "model.safetensors" in teacher["problem"]
    statuses = execute(plan, run_dir, only=["teacher", "meta", "m2mkd:0"])
    assert [(s.name, s.state) for s in statuses] == [("teacher", "done"), ("meta", "cached"), ("m2mkd:0", "done")]
    assert RunDir(run_dir).is_done(plan.job("teacher"))


def test_load_student_names_a_corrupt_product(plan_dict, tmp_path):
    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    job_dir = run_dir / "jobs/finetune"
    job_dir.mkdir(parents=True)
    (job_dir / "model.safetensors").write_bytes(b"not a tensor file")
    (job_dir / "done.json").write_text(json.dumps({"hash": plan.job("finetune").hash, "products": {
        "jobs/finetune/model.safetensors": {"size": 5, "sha256": "0"}}}))
    with pytest.raises(MonomodError, match="finetune/model.safetensors has 17 bytes, 5 when its job finished"):
        load_student(run_dir)


# ------------------------------------------------------------------------------------------ 6. atomic export


def test_export_swaps_a_whole_folder_in_and_cleans_leftovers(tmp_path, monkeypatch):
    from monomod.passes import export as ex

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "export.json").write_text('{"files": [{"file": "old.onnx"}]}')
    (out / "old.onnx").write_bytes(b"old")
    leftover = tmp_path / ".onnx.export-999-deadbeef"
    leftover.mkdir()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "_export_checked", killed)
    with pytest.raises(KeyboardInterrupt):
        ex.export_all([object()], out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "old.onnx"]  # the old export, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # leftovers and staging gone
    monkeypatch.undo()
    ex.export_all([], out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]
    assert json.loads((out / "export.json").read_text())["files"] == []
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(MonomodError, match="not empty and holds no export.json"):
        ex.export_all([], tmp_path / "mine")


def test_temporary_files_of_killed_writes_are_cleaned_on_the_next_run(plan_dict, tmp_path, stub_runners):
    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    stray = run_dir / "jobs/meta/.model.safetensors.tmp-12345-0123abcd"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"half")
    aside = run_dir / "jobs/meta/.checkpoint.old-12345-0123abcd"
    aside.mkdir()  # may be the last complete checkpoint: kept
    execute(plan, run_dir, only=["teacher"])
    assert not stray.exists() and aside.exists()


# ----------------------------------------------------------------------------- 7. checked at compile time


def _weights(tmp_path: Path) -> dict[str, Path]:
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    wrong = tmp_path / "wrong.safetensors"
    save_file({"blocks.0.attn.qkv.weight": torch.zeros(2, 2)}, str(wrong))
    return {"corrupt": corrupt, "wrong": wrong}


def test_bad_input_is_refused_at_compile_time_in_a_dry_run(tmp_path):
    weights = _weights(tmp_path)
    folder = tmp_path / "images"
    for split in ("train", "val"):
        (folder / split / "cat").mkdir(parents=True)
        (folder / split / "dog").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(folder / "train" / "cat" / "a.png")
    base = ["vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--dry-run"]
    cases = [
        (["--img-size", "8"], "cannot take an input of shape (1, 3, 8, 8)"),
        (["--img-size", "0"], "--img-size must be at least 1"),
        (["--in-chans", "0"], "--in-chans must be at least 1"),
        (["--set", "student_overrides.bogus=1"], "unexpected keyword argument 'bogus'"),
        (["--set", "student_overrides.embed_dim=-5"], "the vit student cannot be built"),
        (["--weights", weights["corrupt"]], "is not a readable safetensors file"),
        (["--weights", weights["wrong"]], "does not fit the teacher"),
        (["--set", "budgets.m2mkd.lr=.inf"], "budgets.m2mkd.lr=inf is invalid"),
        (["--set", "budgets.m2mkd.lr=0"], "lr=0 must be positive and finite"),
        (["--reuse", str(tmp_path)], "is not a monomod run"),
        (["--modules", "1000000"], "is more than vit_tiny can be cut into"),
    ]
    for extra, message in cases:
        line = _one_line_error(_cli("convert", *base, *extra))
        assert message in line, (extra, line)
    line = _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", f"imagefolder:{folder}",
                                "--dry-run"))
    assert f"class folder {shorten(str(folder / 'train' / 'dog'))} holds no images" in line  # long paths are cut


# ------------------------------------------------------------------------------------------- 8. no tracebacks


def test_unwritable_and_over_long_paths_are_one_line(tmp_path):
    base = ["convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--img-size", "32"]
    for out in ("/proc/monomod-run", tmp_path / ("x" * 300) / "run"):
        line = _one_line_error(_cli(*base, "--out", out))
        assert "error: cannot" in line
    line = _one_line_error(_cli("export", "vit_tiny", "-k", "2", "--img-size", "32", "--onnx", "/proc/monomod-onnx"))
    assert "cannot write next to --onnx" in line
    line = _one_line_error(_cli(*base, "--seed", "9" * 5000))
    assert "--seed must be an integer" in line and len(line) < 300


@pytest.mark.parametrize("flag", ["--img-size", "--in-chans", "--modules"])
def test_student_refuses_zero_sizes(flag):
    assert f"{flag} must be at least 1" in _one_line_error(_cli("student", "vit", flag, "0"))


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["jobs"].insert(0, "teacher"), "job #1 is 'teacher', not a mapping"),
    (lambda d: d["jobs"][0].pop("name"), "job #1 has no name or kind"),
    (lambda d: d["jobs"][0]["config"]["train"].update(steps="many"), "job 'teacher': training config: steps='many' "
                                                                     "must be an integer"),
    (lambda d: d["jobs"][1].update(inputs=["nobody"]), "reads from nobody, which is no job of this plan"),
])
def test_bad_plan_files_are_one_line(plan_dict, tmp_path, edit, message):
    data = json.loads(json.dumps(plan_dict))
    edit(data)
    _write_plan(tmp_path / "run", data)
    assert message in _one_line_error(_cli("run", tmp_path / "run"))


def test_a_corrupt_image_met_mid_epoch_names_the_file(tmp_path):
    from monomod.data.folders import _PilLoader

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(MonomodError, match=f"cannot read image {bad}"):
        _PilLoader("RGB")(str(bad))


# ------------------------------------------------------------------------------------------------- 9. messages


def test_messages_point_at_the_right_fix(tmp_path):
    line = _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "0", "--dry-run"))
    assert "--modules must be at least 1, got 0" in line and "K >= 2" not in line
    line = _one_line_error(_cli("convert", "--recipe", tmp_path / "missing.yaml", "--dry-run"))
    assert "recipe file" in line and "does not exist" in line
    long_name = "x" * 2000
    line = _one_line_error(_cli("convert", long_name, "--to", "vit", "-k", "2", "--dry-run"))
    assert len(line) < 1000


def test_a_non_finite_loss_claims_no_checkpoint_and_suggests_a_sane_lr(tmp_path):
    model = nn.Linear(4, 3)

    def loss_fn(x, y):
        return model(x).sum() * float("nan"), None

    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]
    with pytest.raises(MonomodError) as info:
        train(model, loss_fn, lambda epoch: iter(data), TrainConfig(steps=3, lr=1e30), job_dir=tmp_path / "job")
    message = str(info.value)
    assert "no checkpoint was written yet" in message and "was kept" not in message
    assert "lr=0.001" in message


# ====================================================================================================================
# Issue 27: a RUN_DIR someone sends you is safe to open; hostile YAML and paths refused in one line. Sections follow
# the groups; tests/BAD_INPUTS.md lists each case (rows marked 27).


def _pwned_plan(plan_dict: dict, run_dir: Path) -> Path:
    """A RUN_DIR as someone else might send it: plan.yaml names ``os:system`` as the student, with a command."""
    data = json.loads(json.dumps(plan_dict))
    data["settings"].update(student="os:system", student_overrides={"command": f"touch {run_dir.parent / 'PWNED'}"})
    _write_plan(run_dir, data)
    return run_dir


# ------------------------------------------------------------------------------------- 27.1 security of a RUN_DIR


def test_code_named_by_plan_yaml_is_imported_only_with_trust_code_on_every_path(plan_dict, tmp_path):
    from monomod.api import load_run, run, run_exportables

    run_dir = _pwned_plan(plan_dict, tmp_path / "run")
    for call in (lambda: load_student(run_dir), lambda: load_run(run_dir).student("assemble"),
                 lambda: load_run(run_dir).student("baseline"), lambda: run_exportables(run_dir),
                 lambda: run_exportables(run_dir, ["teacher"]), lambda: run(run_dir)):
        with pytest.raises(MonomodError, match="names Python code as its student"):
            call()
    for args in (("export", run_dir, "--onnx", tmp_path / "onnx"), ("run", run_dir)):
        assert "--trust-code" in _one_line_error(_cli(*args))
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "onnx").exists()


def test_a_symlinked_lock_deletes_nothing_outside_the_run_dir(tmp_path):
    outside = tmp_path / "precious.txt"
    outside.write_text("not json, and old")
    os.utime(outside, (0, 0))  # old enough to look like a torn, stale lock
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(outside)
    with pytest.raises(MonomodError, match="is a symbolic link"):
        with run_dir_lock(run_dir):
            pass
    assert outside.read_text() == "not json, and old"


def test_a_symlinked_log_makes_the_runtime_write_nothing_outside(plan_dict, tmp_path):
    from monomod.safe import open_append

    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    (run_dir / "jobs/evaluate").mkdir(parents=True)
    (run_dir / "jobs/evaluate/log.txt").symlink_to(outside)
    with pytest.raises(MonomodError, match="is a symbolic link that leads out of RUN_DIR"):
        execute(plan, run_dir)
    assert "leads out of RUN_DIR" in _one_line_error(_cli("run", run_dir))
    with pytest.raises(MonomodError, match="does not write through one"):
        open_append(run_dir / "jobs/evaluate/log.txt")
    assert outside.read_text() == "mine\n"


def test_names_from_the_users_files_are_escaped_in_report_md():
    from monomod.report import run_report_markdown
    from monomod.safe import markdown_text, rich_text

    hostile = "cat`<img src=x onerror=alert(1)>"
    settings = {"teacher": hostile, "student": "vit", "modules": 2, "data": f"imagefolder:/d/{hostile}",
                "img_size": 32, "preset": "demo", "meta": "trained", "seed": 0}
    page = run_report_markdown({"settings": settings, "jobs": {}, "total_seconds": 0.0,
                                "warnings": [hostile]}, curves=None)
    assert "<img" not in page and "&lt;img" in page
    assert "<" not in markdown_text("<b>") and "\\`" in markdown_text("`")
    assert rich_text("[/x]") == "\\[/x]"


# ---------------------------------------------------------------------------------------------- 27.2 nothing lost


def test_export_never_deletes_files_its_manifest_does_not_list(tmp_path):
    from monomod.passes import export as ex

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "export.json").write_text('{"files": [{"file": "old.onnx"}]}')
    (out / "old.onnx").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(MonomodError, match=r"does not list \(notes.txt\)"):
        ex.export_all([], out)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "notes.txt", "old.onnx"]
    line = _one_line_error(_cli("export", "vit_tiny", "-k", "2", "--img-size", "32", "--onnx", out))
    assert "notes.txt" in line and (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    ex.export_all([], out)  # only what the earlier export wrote: replaced
    assert sorted(p.name for p in out.iterdir()) == ["export.json"]


@pytest.mark.parametrize("damage", [
    lambda ck: (ck / "tensors.safetensors").write_bytes(os.urandom(300)),
    lambda ck: (ck / "state.json").write_text("{garbage"),
    lambda ck: (ck / "state.json").write_text("[]"),
])
def test_a_corrupt_checkpoint_is_set_aside_and_the_job_restarts(tmp_path, caplog, damage):
    config = {"checkpoint_every": 5, "checkpoint_minutes": 0}
    with pytest.raises(_Boom):
        _interrupted_training(tmp_path / "a", fail_at=8, **config)
    damage(tmp_path / "a" / "job" / "checkpoint")
    with caplog.at_level("WARNING", logger="monomod.runtime.checkpoint"):
        result = _interrupted_training(tmp_path / "a", fail_at=None, **config)
    uninterrupted = _interrupted_training(tmp_path / "b", fail_at=None, **config)
    assert result.resumed_from == 0 and result.steps == 12
    assert (result.final_loss, result.train_acc) == (uninterrupted.final_loss, uninterrupted.train_acc)
    assert (tmp_path / "a/job/checkpoint.unreadable-1").is_dir()  # kept, renamed
    said = [r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage()]  # logged once
    assert len(said) == 1 and "set aside as checkpoint.unreadable-1, the job restarts from step 0" in said[0]


def test_a_done_record_without_its_product_list_is_not_done(plan_dict, tmp_path, stub_runners):
    plan = _plan(plan_dict)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher"])
    done = run_dir / "jobs/teacher/done.json"
    record = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in record.items() if k != "products"}))
    product = run_dir / "jobs/teacher/model.safetensors"
    product.write_bytes(product.read_bytes()[:100])  # and truncated
    assert "lists no size and sha256" in RunDir(run_dir).done_problem(plan.job("teacher"))
    shown = json.loads(_cli("plan", "show", run_dir, "--format", "json").output)["jobs"][0]
    assert shown["done"] is False
    statuses = execute(plan, run_dir, only=["teacher"])
    assert [(s.name, s.state) for s in statuses] == [("teacher", "done")]
    assert RunDir(run_dir).is_done(plan.job("teacher"))


# ------------------------------------------------------------------------------------ 27.3 hostile YAML and text

_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
_HOSTILE_YAML = [
    (_BOMB.encode(), "alias bomb"),
    (b"description: x\xff\xfe\n", "is not UTF-8 text"),
    (b"seed: " + b"9" * 5000 + b"\n", "an integer has 5000 digits"),
    (b"[" * 20000 + b"]" * 20000, "nested deeper than"),
    (b"description: a\ndescription: b\ndescription: c\n", "the key 'description' is given twice"),
    (b"description: x\nwhen: 2024-01-01\n", "is a timestamp"),
    (b"a: &a [*a]\n", "refers to a value that holds it"),
]


@pytest.mark.parametrize("text, message", _HOSTILE_YAML)
def test_hostile_yaml_is_one_line_in_recipes_and_plans(plan_dict, tmp_path, text, message):
    import time

    recipe = tmp_path / "hostile.yaml"
    recipe.write_bytes(text)
    started = time.perf_counter()
    assert message in _one_line_error(_cli("convert", "--recipe", recipe, "--dry-run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plan.yaml").write_bytes(text)
    for args in (("run", tmp_path / "run"), ("plan", "show", tmp_path / "run", "--format", "json")):
        assert message in _one_line_error(_cli(*args))
    assert time.perf_counter() - started < 10


def test_a_date_in_a_plan_never_reaches_a_job(plan_dict, tmp_path):
    data = json.loads(json.dumps(plan_dict))
    data["settings"]["seed"] = "DATE"
    _write_plan(tmp_path / "run", data)
    path = tmp_path / "run" / "plan.yaml"
    path.write_text(path.read_text().replace("seed: DATE", "seed: 2024-01-01"))
    assert "is a timestamp" in _one_line_error(_cli("plan", "show", tmp_path / "run", "--format", "json"))


def test_huge_files_are_refused_before_they_are_read(tmp_path):
    from monomod.safe import MAX_YAML_BYTES

    recipe = tmp_path / "big.yaml"
    recipe.write_text("description: x\n" + "#" * MAX_YAML_BYTES)
    assert "more than" in _one_line_error(_cli("convert", "--recipe", recipe, "--dry-run"))


@pytest.mark.parametrize("where", ["--out", "--data", "MODEL"])
def test_rich_markup_in_a_path_or_name_never_crashes(tmp_path, where):
    markup = str(tmp_path / "a[/x]b[bold]")
    base = {"MODEL": "vit_tiny", "--data": "synthetic", "--out": str(tmp_path / "run")}
    base[where] = markup if where != "--data" else f"imagefolder:{markup}"
    result = _cli("convert", base["MODEL"], "--to", "vit", "-k", "2", "--img-size", "32", "--data", base["--data"],
                  "--out", base["--out"], "--dry-run")
    if where == "--out":
        assert result.exit_code == 0 and "a[/x]b[bold]" in result.output.replace("\n", ""), result.output
    else:
        assert "a[/x]b[bold]" in _one_line_error(result)


@pytest.mark.parametrize("sets, message", [
    (["seed=" + "9" * 5000], "an integer has 5000 digits"),
    (["data_info.num_classes=5"], "data_info.num_classes is 5, but synthetic has 10"),
    (["when=2024-01-01"], "is a timestamp"),
    (["teacher_seed=" + "9" * 40], "an integer has 40 digits"),
])
def test_set_goes_through_the_same_checks(sets, message):
    args = [arg for text in sets for arg in ("--set", text)]
    line = _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic",
                                "--img-size", "32", "--dry-run", *args))
    assert message in line and len(line) < 400


# ------------------------------------------------------------------------------ 27.4 refused before the work


def _image_folder(root: Path, classes: dict[str, int]) -> Path:
    from PIL import Image

    for split in ("train", "val"):
        for name, count in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("extra, message", [
    (["--in-chans", "1000000"], "--in-chans must be at most 1024, got 1000000"),
    (["--set", "student_overrides.embed_dim=100000000"], "student parameters"),
    (["--img-size", "100000"], "activations"),
    (["--to", "nac", "-k", "3", "--img-size", "33"], "img_size=33 is not a multiple of patch_size=4"),
    (["--to", "vit", "--img-size", "40"], "img_size=40 is not a multiple of patch_size=16"),
])
def test_what_would_fail_after_training_is_refused_at_compile_time(extra, message):
    import time

    started = time.perf_counter()
    args = ["vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--img-size", "32", "--dry-run"]
    line = _one_line_error(_cli("convert", *args, *extra))
    assert message in line and time.perf_counter() - started < 30


def test_the_memory_estimate_names_the_largest_term_and_its_option():
    from monomod.compiler.checks import check_memory, training_bytes

    terms = training_bytes(params=10**9, activation_bytes_per_sample=10**6, batch_size=64)
    assert terms == {"parameters": 16 * 10**9, "activations": 64 * 10**6}
    check_memory(terms, {}, limit=10**12)
    with pytest.raises(MonomodError, match=r"needs about 15 GiB .*more than 1 GiB \(the limit\); lower the model"):
        check_memory(terms, {"parameters": "lower the model"}, limit=1 << 30)


def test_an_image_folder_with_one_class_is_refused_at_compile_time(tmp_path):
    folder = _image_folder(tmp_path / "data", {"cat": 2})
    line = _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", f"imagefolder:{folder}",
                                "--img-size", "32", "--dry-run"))
    assert "has one class folder (cat); a classifier needs two or more" in line


# ------------------------------------------------------------------------------- 27.5 commands other than convert


@pytest.mark.parametrize("args, message", [
    (["inspect", "vit_tiny", "--tolerance", "-5"], "--tolerance must be a number >= 0, got -5.0"),
    (["inspect", "vit_tiny", "--tolerance", "nan"], "--tolerance must be a number >= 0, got nan"),
    (["inspect", "vit_tiny", "--cuts", ",,,"], "--cuts must be"),
    (["inspect", "vit_tiny", "--num-classes", "-1"], "--num-classes must be at least 1, got -1"),
    (["inspect", "vit_tiny", "-k", "0"], "--modules must be at least 1, got 0"),
    (["student", "nac", "--modules", "100000"], "more stages than a student can have (256 at most)"),
    (["student", "nac", "--num-classes", "1000000000"], "the student needs about"),
    (["student", "vit", "--img-size", "100000"], "the student needs about"),
    (["student", "vit", "--img-size", "7"], "img_size=7 is not a multiple of patch_size=4"),
    (["student", "moe", "--img-size", "30"], "img_size=30 is not a multiple of patch_size=4"),
    (["export", "vit_tiny", "-k", "2", "--opset", "1", "--onnx", "OUT"], "--opset 1 is not an ONNX opset"),
    (["export", "runs/missing", "--onnx", "OUT"], "is neither a RUN_DIR nor a model name"),
    (["export", "vit_tiny", "-k", "2", "--onnx", ""], "--onnx is empty"),
    (["export", "vit_tiny", "-k", "2", "--img-size", "-3", "--onnx", "OUT"],
     "--img-size must be at least 1, got -3"),
])
def test_every_command_checks_its_options_like_convert(tmp_path, args, message):
    import time

    started = time.perf_counter()
    line = _one_line_error(_cli(*[str(tmp_path / "onnx") if a == "OUT" else a for a in args]))
    assert message in line and time.perf_counter() - started < 30
    assert not (tmp_path / "onnx").exists()


# --------------------------------------------------------------------------------------------------- 27.6 data


def _bomb_png() -> bytes:
    """150 bytes declaring a 50000 x 50000 image: PIL refuses it as a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 50000, 50000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def test_bombs_special_files_and_link_loops_are_unreadable_images_named_once(tmp_path, caplog):
    from monomod.data import load_data

    folder = _image_folder(tmp_path / "data", {"cat": 3, "dog": 3})
    (folder / "train/cat/bomb.png").write_bytes(_bomb_png())
    os.mkfifo(folder / "train/cat/fifo.png")
    (folder / "train/dog/loop").symlink_to("..")
    (folder / "train/dog/dangling.png").symlink_to(tmp_path / "nowhere.png")
    with caplog.at_level("WARNING", logger="monomod.data"):
        bundle = load_data(f"imagefolder:{folder}", img_size=16, in_chans=3)
        assert [bundle.train[i][0].shape for i in range(len(bundle.train))] == [(3, 16, 16)] * 6
    assert len(bundle.train) == 6 and bundle.num_classes == 2
    named = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sorted(Path(m.split()[3]).name for m in named) == ["bomb.png", "dangling.png", "fifo.png"]
    assert any("3 unreadable image(s) skipped" in r.getMessage() for r in caplog.records)


def test_a_class_whose_images_are_all_corrupt_is_refused_not_dropped(tmp_path):
    folder = _image_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    for image in (folder / "train/dog").iterdir():
        image.write_bytes(b"garbage")
    line = _one_line_error(_cli("convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", f"imagefolder:{folder}",
                                "--img-size", "32", "--dry-run"))
    assert f"class folder {folder / 'train/dog'} has no images it can read (2 unreadable)" in line


# ------------------------------------------------------------------------------------------ 27.7 end to end


@pytest.mark.slow
def test_markup_in_out_and_a_lost_product_list_end_in_a_finished_run(tmp_path):
    out = tmp_path / "a[/x]b"
    tiny = [arg for job in ("teacher", "meta", "incubate", "m2mkd", "finetune")
            for arg in ("--set", f"budgets.{job}.steps=1")]
    args = ["convert", "vit_tiny", "--to", "vit", "-k", "2", "--data", "synthetic", "--img-size", "32",
            "--threads", "1", "--out", out, *tiny]
    first = _cli(*args)
    assert first.exit_code == 0 and "report.md" in first.output, first.output
    report = json.loads((out / "report.json").read_text())
    done = out / "jobs/finetune/done.json"
    done.write_text(json.dumps({k: v for k, v in json.loads(done.read_text()).items() if k != "products"}))
    again = _cli("run", out)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "report.json").read_text())["student"] == report["student"]
