"""Deep Incubation as plan jobs, per-module evidence in every run, and distillation data apart from the task's."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sklearn.datasets import load_digits

import monomod
from monomod.compiler import ConvertOptions
from monomod.passes.schedule import DataInfo
from plan_helpers import compile_plan
from monomod.report import module_warnings
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.runtime.jobs import RunContext, measure_hybrids
from monomod.runtime.losses import m2mkd_loss
from plan_helpers import tiny_plan

DATA = DataInfo(num_classes=10, in_chans=3, train_size=1437)


def plan_for(**kwargs):
    options = dict(teacher="vit_tiny", student="nac", modules=3, img_size=32)
    options.update(kwargs)
    return compile_plan(ConvertOptions(**options), DATA)


def test_incubate_plan_trains_the_teacher_in_the_meta_model():
    plan = plan_for()
    assert plan.settings["teacher_training"] == "incubate"
    names = [j.name for j in plan.jobs]
    assert names[:5] == ["meta", "incubate:0", "incubate:1", "incubate:2", "teacher"]
    assert all(plan.job(f"incubate:{i}").inputs == ["meta"] for i in range(3))  # side by side
    assert plan.job("teacher").inputs == ["incubate:0", "incubate:1", "incubate:2"]
    assert plan.job("teacher").config["from"] == "incubate"
    assert plan.job("m2mkd:1").inputs == ["incubate:1", "meta"] and plan.job("m2mkd:1").config["target"] == "incubate:1"
    finetuned = plan_for(distill_targets="finetuned")
    assert finetuned.job("m2mkd:1").inputs == ["teacher", "meta"] and finetuned.job("m2mkd:1").config["target"] == "teacher"


def test_end_to_end_and_none_plans():
    e2e = plan_for(teacher_training="end-to-end")
    assert not [j for j in e2e.jobs if j.kind == "incubate"] and e2e.job("teacher").inputs == []
    assert e2e.job("m2mkd:0").config["target"] == "teacher"
    given = plan_for(teacher_training="none", weights="teacher.safetensors")
    assert given.job("teacher").config["skip_training"] is True
    assert given.job("incubate:0").inputs == ["meta"] and given.job("m2mkd:0").inputs == ["incubate:0", "meta"]
    as_meta = plan_for(meta="teacher")  # no meta model to incubate in: the teacher trains end to end
    assert as_meta.settings["teacher_training"] == "end-to-end" and as_meta.job("m2mkd:0").inputs == ["teacher"]
    assert plan_for(meta="teacher", teacher_trained=True).job("teacher").config["skip_training"] is True
    cases = [
        (dict(meta="teacher", teacher_training="incubate"), "Deep Incubation trains the teacher's modules inside"),
        (dict(teacher_training="none"), "no trained weights are given"),
        (dict(teacher_trained=True, teacher_training="incubate"), "--teacher-trained says"),
        (dict(teacher_training="sideways"), "unknown --teacher-training"),
        (dict(distill_targets="both"), "unknown distill_targets"),
        (dict(budgets={"incubate": {"steps": 0}}), "budgets.incubate.steps=0 is invalid"),
    ]
    for options, message in cases:
        with pytest.raises(monomod.MonomodError, match=message):
            plan_for(**options)


def test_paper_preset_keeps_the_references_m2mkd_regularisation():
    paper, demo = plan_for(preset="paper"), plan_for(preset="demo")
    m2mkd = paper.job("m2mkd:0").config
    assert m2mkd["loss"]["kl_norm"] == "reference" and demo.job("m2mkd:0").config["loss"]["kl_norm"] == "batchmean"
    assert m2mkd["train"]["mixup"] == 0.8 and m2mkd["train"]["label_smoothing"] == 0.1
    assert paper.job("teacher").config["train"]["warmup_steps"] == 0  # FT: no warm-up, as the reference
    assert plan_for(preset="paper", kl_norm="batchmean").job("m2mkd:0").config["loss"]["kl_norm"] == "batchmean"


def test_m2mkd_loss_takes_mixed_soft_targets():
    torch.manual_seed(0)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5)
    hard = torch.tensor([0, 1, 2, 3, 4, 0])
    one_hot = torch.nn.functional.one_hot(hard, 5).float()
    torch.testing.assert_close(m2mkd_loss(student, teacher, one_hot), m2mkd_loss(student, teacher, hard))
    smoothed = m2mkd_loss(student, teacher, hard, label_smoothing=0.1)
    expected = 0.5 * torch.nn.functional.cross_entropy(student, hard, label_smoothing=0.1) + 0.5 * (
        m2mkd_loss(student, teacher, hard, alpha=1.0))
    torch.testing.assert_close(smoothed, expected)


@pytest.mark.slow
def test_incubate_job_changes_only_its_module_and_the_run_reports_every_module(tmp_path):
    plan = tiny_plan(student="vit", modules=3, teacher_training="incubate", steps=4)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["meta"])
    meta_before = load_file(str(run_dir / "jobs/meta/model.safetensors"))
    ctx = RunContext(run_dir=run_dir, plan=plan)
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in ctx.initial_teacher_module(1).state_dict().items()}
    execute(plan, run_dir, only=["incubate:1"])
    incubated = load_file(str(run_dir / "jobs/incubate-1/model.safetensors"))
    assert set(incubated) == set(start) and all(k.startswith("blocks.") for k in incubated)  # module 1's own weights
    assert any(not torch.equal(incubated[k], start[k]) for k in start)
    meta_after = load_file(str(run_dir / "jobs/meta/model.safetensors"))
    assert meta_after.keys() == meta_before.keys() and all(torch.equal(meta_after[k], meta_before[k]) for k in meta_before)
    record = json.loads((run_dir / "jobs/incubate-1/done.json").read_text())
    assert 0.0 <= record["result"]["teacher_hybrid_acc"] <= 1.0

    execute(plan, run_dir)
    ctx = RunContext(run_dir=run_dir, plan=plan)
    # module 1 of the fine-tuned teacher and incubated module 1, both alive in one process, keep their own weights
    finetuned, incubated_module = ctx.teacher_module(1, "teacher"), ctx.teacher_module(1, "incubate:1")
    assert all(torch.equal(incubated_module.state_dict()[k], v) for k, v in incubated.items())
    assert all(torch.equal(finetuned.state_dict()[k], v) for k, v in ctx.product("teacher").items() if k in incubated)
    teacher = load_file(str(run_dir / "jobs/teacher/model.safetensors"))
    assert {k for k in teacher if k.startswith("blocks.")} >= set(incubated)  # FT started from the incubated modules
    report = json.loads((run_dir / "report.json").read_text())
    assert [m["module"] for m in report["modules"]] == [0, 1, 2]
    for m in report["modules"]:
        assert all(0.0 <= m[key] <= 1.0 for key in ("teacher_hybrid_acc", "student_hybrid_acc", "agreement",
                                                       "incubated_hybrid_acc"))
    assert report["modules"][1]["incubated_hybrid_acc"] == record["result"]["teacher_hybrid_acc"]
    markdown = (run_dir / "report.md").read_text()
    assert "teacher hybrid top-1" in markdown and "m2mKD student, assembled (before fine-tune)" in markdown


@pytest.mark.slow
def test_chance_warning_names_a_mismatched_module(tmp_path):
    plan = tiny_plan(student="vit", modules=2, steps=30)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["meta"])
    ctx = RunContext(run_dir=run_dir, plan=plan)
    torch.manual_seed(0)
    stranger = ctx.initial_teacher_module(0).eval()  # never met the meta model: a deliberately mismatched pair
    scores = measure_hybrids(ctx, 0, {"teacher_hybrid": stranger, "student_hybrid": ctx.meta().stages[0]})
    assert scores["student_hybrid_acc"] > 0.3 > scores["teacher_hybrid_acc"]  # the meta model's own stage fits
    warnings = module_warnings([{"module": 0, **scores}, {"module": 1, "teacher_hybrid_acc": 0.9}], 10, "end-to-end")
    assert len(warnings) == 1 and warnings[0].startswith("module 0: its teacher hybrid reaches")
    assert "--teacher-training incubate" in warnings[0]
    assert "raise budgets.incubate" in module_warnings([{"module": 0, **scores}], 10, "incubate")[0]


def _digits_folder(root, classes):
    digits = load_digits()
    for split, rows in (("train", range(0, 1200)), ("val", range(1200, 1500))):
        for i in rows:
            label = int(digits.target[i])
            if label in classes:
                folder = root / split / f"digit{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray((digits.images[i] * 16).astype("uint8")).save(folder / f"{i}.png")
    return f"imagefolder:{root}"


@pytest.mark.slow
def test_distill_data_with_another_class_count(tmp_path):
    data = _digits_folder(tmp_path / "three", classes=(0, 1, 2))
    options = ConvertOptions(teacher="vit_tiny", student="vit", modules=2, data=data, distill_data="synthetic",
                             ood="none", img_size=32, teacher_training="end-to-end")
    plan = compile_options(options)
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=3, batch_size=16, warmup_steps=1)
    plan.rehash()
    assert plan.settings["num_classes"] == 3 and plan.settings["distill_num_classes"] == 10
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir)
    assert load_file(str(run_dir / "jobs/teacher/model.safetensors"))["head.weight"].shape[0] == 10
    distilled = load_file(str(run_dir / "jobs/m2mkd-1/model.safetensors"))
    student = load_file(str(run_dir / "jobs/finetune/model.safetensors"))
    head = next(k for k in student if k.endswith("head.weight"))
    assert student[head].shape[0] == 3 and any(v.shape[0] == 10 for k, v in distilled.items() if k.endswith("head.weight"))
    done = json.loads((run_dir / "jobs/assemble/done.json").read_text())
    assert done["result"]["reinitialised"]  # the 10-class head could not be kept
    report = json.loads((run_dir / "report.json").read_text())
    assert report["student"]["ood_acc"] is None and 0.0 <= report["student"]["iid_acc"] <= 1.0
    assert "Distilled on `synthetic`" in (run_dir / "report.md").read_text()


def test_teacher_seed_lets_student_seeds_share_one_teacher_side():
    """Seeds 0 and 1 with teacher seed 0: the meta model, incubation and the teacher's FT are the same jobs (so
    --reuse shares them, as a pretrained teacher is shared); the student side differs."""
    first, second = plan_for(seed=0), plan_for(seed=1, teacher_seed=0)
    same = {job.name for job in second.jobs if job.hash == first.job(job.name).hash}
    assert same == {"meta", "incubate:0", "incubate:1", "incubate:2", "teacher"}
    assert second.job("m2mkd:0").config["train"]["seed"] != first.job("m2mkd:0").config["train"]["seed"]
    assert not {job.name for job in plan_for(seed=1).jobs if job.hash == first.job(job.name).hash}


def test_few_label_runs_reuse_the_m2mkd_jobs_of_the_full_data_run():
    """m2mKD trains on the distillation data alone: fine-tuning on few labels shares every training job before the
    fine-tune (assemble, which builds the task's student in a fraction of a second, reads the task's data)."""
    full = plan_for(data="digits")
    few = plan_for(data="digits:shots=5", distill_data="digits")
    same = {job.name for job in few.jobs if job.hash == full.job(job.name).hash}
    assert {"meta", "teacher", *(f"m2mkd:{i}" for i in range(3))} <= same
    assert not same & {"finetune", "baseline", "evaluate"}
