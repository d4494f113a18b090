import copy

import pytest
import torch
import torch.nn.functional as F

import monomod
from monomod.compiler import ConvertOptions
from monomod.passes.schedule import DataInfo
from plan_helpers import compile_plan
from monomod.plan import Job, Plan
from monomod.runtime.losses import m2mkd_loss

DATA = DataInfo(num_classes=10, in_chans=3, train_size=1437)


def plan_for(**kwargs) -> Plan:
    """A plan whose teacher is trained end to end (the plan mechanics these tests check do not depend on it)."""
    options = dict(teacher="vit_tiny", student="nac", modules=4, img_size=32, teacher_training="end-to-end")
    options.update(kwargs)
    return compile_plan(ConvertOptions(**options), DATA)


def test_plan_jobs_and_dependencies():
    plan = plan_for()
    names = [j.name for j in plan.jobs]
    assert names == ["teacher", "meta", "m2mkd:0", "m2mkd:1", "m2mkd:2", "m2mkd:3", "assemble", "finetune", "baseline", "evaluate"]
    assert all(plan.job(f"m2mkd:{i}").inputs == ["teacher", "meta"] for i in range(4))  # independent of each other
    assert plan.job("meta").inputs == [] and plan.job("teacher").inputs == []  # side by side
    assert plan.job("assemble").inputs == [f"m2mkd:{i}" for i in range(4)]
    assert plan.job("baseline").inputs == []
    with_teacher_meta = plan_for(meta="teacher")
    assert "meta" not in [j.name for j in with_teacher_meta.jobs]
    assert with_teacher_meta.job("m2mkd:0").inputs == ["teacher"]


def test_plan_yaml_round_trip_is_unchanged():
    plan = plan_for(student="moe", modules=3, feature_loss=0.1)
    text = plan.to_yaml()
    again = Plan.from_yaml(text)
    assert again.to_yaml() == text
    assert [j.hash for j in again.jobs] == [j.hash for j in plan.jobs]


def test_plan_is_deterministic_and_hashes_are_content_hashes():
    assert plan_for().to_yaml() == plan_for().to_yaml()
    assert len({j.hash for j in plan_for().jobs}) == 10


def test_changing_one_job_invalidates_it_and_its_dependents_only():
    plan = plan_for()
    before = {j.name: j.hash for j in plan.jobs}
    plan.job("m2mkd:2").config["train"]["steps"] += 1
    plan.rehash()
    changed = {j.name for j in plan.jobs if j.hash != before[j.name]}
    assert changed == {"m2mkd:2", "assemble", "finetune", "evaluate"} == {"m2mkd:2", *plan.dependents("m2mkd:2")}
    settings_changed = plan_for(data="synthetic")
    assert all(j.hash != before[j.name] for j in settings_changed.jobs)


def test_a_new_student_keeps_the_teacher_and_meta_jobs():
    nac = {j.name: j.hash for j in plan_for().jobs}
    moe = {j.name: j.hash for j in plan_for(student="moe", student_overrides={"patch_size": 16}).jobs}
    assert moe["teacher"] == nac["teacher"] and moe["meta"] == nac["meta"]
    assert all(moe[name] != nac[name] for name in ("m2mkd:0", "baseline", "finetune"))
    teacher_as_meta = {j.name: j.hash for j in plan_for(meta="teacher").jobs}
    assert teacher_as_meta["baseline"] == nac["baseline"]  # scratch training never sees the meta model
    assert teacher_as_meta["m2mkd:0"] != nac["m2mkd:0"]
    other_k = {j.name: j.hash for j in plan_for(modules=5).jobs}
    assert other_k["teacher"] == nac["teacher"] and other_k["meta"] != nac["meta"]


def test_an_upcycled_baseline_waits_for_the_teacher():
    assert plan_for(student="moe").job("baseline").inputs == []
    assert plan_for(student="moe", upcycle=True).job("baseline").inputs == ["teacher"]


def test_bad_plans_and_options():
    with pytest.raises(monomod.MonomodError, match="unknown student --to 'cnn'"):
        plan_for(student="cnn")
    with pytest.raises(monomod.MonomodError, match="nac student needs at least 3 modules"):
        plan_for(modules=2)
    with pytest.raises(monomod.MonomodError, match="--modules must be at least 1"):
        plan_for(student="moe", modules=0)
    with pytest.raises(monomod.MonomodError, match="feature-loss needs the student's boundaries"):
        plan_for(feature_loss=1.0)
    with pytest.raises(monomod.MonomodError, match="unknown --meta"):
        plan_for(meta="none")
    with pytest.raises(monomod.MonomodError, match="do not run before it"):
        Plan(settings={}, jobs=[Job("assemble", "assemble", ["teacher"], [], {}), Job("teacher", "teacher", [], [], {})])
    with pytest.raises(monomod.MonomodError, match="unknown kind"):
        Plan(settings={}, jobs=[Job("a", "train", [], [], {})])
    with pytest.raises(monomod.MonomodError, match="not valid YAML"):
        Plan.from_yaml("jobs: [unclosed")


def test_paper_preset_uses_reference_hyper_parameters():
    plan = plan_for(preset="paper", img_size=None)
    m2mkd = plan.job("m2mkd:0").config["train"]
    assert m2mkd["steps"] == 100 * 3  # 100 epochs of ceil(1437 / 512) steps
    assert m2mkd["lr"] == 5e-4 and m2mkd["batch_size"] == 512 and m2mkd["weight_decay"] == 0.05
    finetune = plan.job("finetune").config["train"]
    assert finetune["label_smoothing"] == 0.1 and finetune["mixup"] == 0.8


def test_m2mkd_loss_matches_a_hand_computation():
    torch.manual_seed(0)
    zs, zt, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 3, 1, 4])
    alpha, tau = 0.3, 2.0
    ce = -torch.log_softmax(zs, -1)[torch.arange(4), y].mean()
    p_t, p_s = torch.softmax(zt / tau, -1), torch.softmax(zs / tau, -1)
    kl_sum = (p_t * (p_t.log() - p_s.log())).sum()
    expected = (1 - alpha) * ce + alpha * tau**2 * kl_sum / 4
    torch.testing.assert_close(m2mkd_loss(zs, zt, y, alpha=alpha, tau=tau), expected)
    reference = (1 - alpha) * ce + alpha * tau**2 * kl_sum / 20  # DeiT / m2mKD code: divide by batch x classes
    torch.testing.assert_close(m2mkd_loss(zs, zt, y, alpha=alpha, tau=tau, kl_norm="reference"), reference)
    hard = (1 - alpha) * ce + alpha * F.cross_entropy(zs, zt.argmax(-1))
    torch.testing.assert_close(m2mkd_loss(zs, zt, y, alpha=alpha, tau=tau, kd="hard"), hard)
    zs_grad = zs.clone().requires_grad_()
    zt_grad = zt.clone().requires_grad_()
    m2mkd_loss(zs_grad, zt_grad, y).backward()
    assert zt_grad.grad is None and zs_grad.grad is not None  # never a gradient into the teacher


def test_threads_and_compile_change_no_hash_precision_changes_every_training_job():
    """Threads and compilation say how a job runs (only rounding moves), precision what it computes."""
    base = {j.name: j.hash for j in plan_for(threads=2, precision="fp32").jobs}
    assert {j.name: j.hash for j in plan_for(threads=7, precision="fp32").jobs} == base
    assert {j.name: j.hash for j in plan_for(threads=2, precision="fp32", compile=True).jobs} == base
    bf16 = plan_for(threads=2, precision="bf16")
    assert all(job.config["train"]["precision"] == "bf16" for job in bf16.jobs if "train" in job.config)
    assert plan_for(threads=7).settings["threads"] == 7
    assert all(job.hash != base[job.name] for job in bf16.jobs)  # every job trains or reads a trained job


def test_side_by_side_jobs_start_longest_remaining_path_first():
    from monomod.runtime.execute import _longest_path_first

    plan = plan_for(teacher_training="incubate")
    for i, steps in enumerate((50, 300, 100, 300)):
        plan.job(f"m2mkd:{i}").config["train"]["steps"] = steps
    plan.rehash()
    order = sorted((j.name for j in plan.jobs), key=_longest_path_first(plan).get)
    m2mkd = [name for name in order if name.startswith("m2mkd")]
    assert m2mkd == ["m2mkd:1", "m2mkd:3", "m2mkd:2", "m2mkd:0"]  # longest first, plan order among equals
    assert order.index("meta") < order.index("baseline")  # meta heads the longest chain (incubate, FT, m2mKD, ...)
