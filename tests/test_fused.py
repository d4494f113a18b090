"""The fused m2mKD job (``--m2mkd fused``): its layout, each student equal to its separate job given the same
batches, a killed fused job resuming bitwise, and the per-module products downstream jobs read."""
import json

import pytest
import torch
from safetensors.torch import load_file

from monomod.compiler import ConvertOptions, compile_options
from monomod.errors import MonomodError
from monomod.passes.fuse import FUSED, fuse_m2mkd, shared_train_config
from monomod.plan import Plan
from monomod.runtime import fused as fused_runtime
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.runtime.fused import resolve_m2mkd

MODULES = 3
# dropout and drop-path on: each student's random stream must be its separate job's
NOISY = {"drop_path_rate": 0.2, "drop_rate": 0.1}


def _plan(mode: str, *, steps: int = 4, same_seeds: bool = False, boundary: float = 0.0) -> Plan:
    options = ConvertOptions(teacher="vit_tiny", student="vit", modules=MODULES, data="synthetic", img_size=32,
                             teacher_training="end-to-end", student_overrides=NOISY, m2mkd=mode, threads=1,
                             boundary_loss=boundary)
    plan = compile_options(options)
    for job in plan.jobs:  # a plan is data: a few steps per job
        for config in [job.config, *job.config.get("members", [])]:
            if "train" in config:
                config["train"].update(steps=steps, batch_size=16, warmup_steps=1)
                if same_seeds and job.kind in ("m2mkd", FUSED):
                    config["train"]["seed"] = 10  # every student sees the first member's batches in both modes
    plan.rehash()
    return plan


def _products(run_dir, names):
    return {name: load_file(str(run_dir / "jobs" / name.replace(":", "-") / "model.safetensors")) for name in names}


def _assert_equal(ours, theirs, what, exact: bool = True):
    assert ours.keys() == theirs.keys(), what
    for key in theirs:
        if exact:
            assert torch.equal(ours[key], theirs[key]), f"{what}: {key}"
        else:
            torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5)  # Adam steps of rounding-level gradients


def test_the_fuse_pass_lays_out_one_job_and_k_publishing_jobs():
    separate, fused = _plan("separate"), _plan("fused")
    names = [job.name for job in fused.jobs]
    members = [f"m2mkd:{i}" for i in range(MODULES)]
    assert names.index(FUSED) < names.index("m2mkd:0") and FUSED not in [j.name for j in separate.jobs]
    assert all(fused.job(name).inputs == [FUSED] for name in members)
    assert fused.job(FUSED).inputs == separate.job("m2mkd:0").inputs
    assert fused.job("assemble").inputs == separate.job("assemble").inputs == members
    # the members keep their configs (stitch, loss, seed): the teacher side is shared, the m2mKD side is not
    assert [m["train"]["seed"] for m in fused.job(FUSED).config["members"]] == [
        separate.job(name).config["train"]["seed"] for name in members]
    assert fused.job("meta").hash == separate.job("meta").hash
    assert fused.job("m2mkd:0").hash != separate.job("m2mkd:0").hash
    assert fuse_m2mkd([j for j in separate.jobs if j.kind != "m2mkd"]) == [j for j in separate.jobs if j.kind != "m2mkd"]
    assert Plan.from_yaml(fused.to_yaml()).to_yaml() == fused.to_yaml()


def test_members_must_share_their_schedule():
    members = _plan("fused").job(FUSED).config["members"]
    assert shared_train_config(members)["seed"] == members[0]["train"]["seed"]
    members[1]["train"]["lr"] = 1.0
    with pytest.raises(ValueError, match="m2mkd:1 has lr=1.0"):
        shared_train_config(members)


def test_auto_resolves_per_device():
    assert resolve_m2mkd("auto", "cpu") == "fused" and resolve_m2mkd("auto", "cuda") == "separate"  # as measured (cuda: not yet)
    assert resolve_m2mkd("separate", "cpu") == "separate" and resolve_m2mkd("fused", "cuda") == "fused"


@pytest.mark.slow
def test_each_student_equals_its_separate_job_given_the_same_batches(tmp_path):
    """With every member on the same seed (so the separate jobs draw the fused job's batches and random streams),
    each fused stage is bitwise its separate job's; with the plan's own seeds, stage 0 still is (its batches are
    the fused job's). With the boundary loss a stage's output gets gradients along two paths, which the fused
    graph (its meta suffix batched across streams) sums in another order: equal to rounding, not bitwise."""
    members = [f"m2mkd:{i}" for i in range(MODULES)]
    for same_seeds, equal, boundary in ((True, members, 0.0), (True, members, 10.0), (False, members[:1], 0.0)):
        runs = {}
        for mode in ("separate", "fused"):
            plan = _plan(mode, same_seeds=same_seeds, boundary=boundary)
            runs[mode] = prepare_run_dir(plan, tmp_path / f"{mode}-{same_seeds}-{boundary}")
            execute(plan, runs[mode], only=[j.name for j in plan.jobs if j.kind in ("teacher", "meta", "m2mkd", FUSED)])
        ours, theirs = _products(runs["fused"], members), _products(runs["separate"], members)
        for name in equal:
            _assert_equal(ours[name], theirs[name], name, exact=not boundary)
        for name in members:  # what the report reads: each module's hybrid accuracies, measured as a separate job
            record = json.loads((runs["fused"] / "jobs" / name.replace(":", "-") / "done.json").read_text())
            assert {"teacher_hybrid_acc", "student_hybrid_acc", "agreement"} <= set(record["result"])
            if name in equal and not boundary:
                separate = json.loads((runs["separate"] / "jobs" / name.replace(":", "-") / "done.json").read_text())
                assert {k: record["result"][k] for k in ("student_hybrid_acc", "agreement")} == {
                    k: separate["result"][k] for k in ("student_hybrid_acc", "agreement")}


class _Boom(Exception):
    pass


@pytest.mark.slow
def test_a_killed_fused_job_resumes_bitwise(tmp_path, monkeypatch):
    """Interrupted after its step-3 checkpoint and run again, the fused job ends with the weights of one run
    straight through (dropout on: the students' random streams resume too), and the whole plan finishes."""
    plan = _plan("fused", steps=6)
    for member in plan.job(FUSED).config["members"]:
        member["train"]["checkpoint_every"] = 3
    plan.rehash()
    members = [f"m2mkd:{i}" for i in range(MODULES)]
    before = [j.name for j in plan.jobs if j.kind in ("teacher", "meta")]
    reference = prepare_run_dir(plan, tmp_path / "reference")
    execute(plan, reference, only=[*before, FUSED, *members])
    killed = prepare_run_dir(plan, tmp_path / "killed")
    execute(plan, killed, only=before)
    original, calls = fused_runtime.fused_loss, {"n": 0}

    def dies_in_step_5(*args, **kwargs):
        loss_fn = original(*args, **kwargs)

        def counted(x, y):
            calls["n"] += 1
            if calls["n"] == 5:
                raise _Boom("killed mid-job")
            return loss_fn(x, y)

        return counted

    monkeypatch.setattr(fused_runtime, "fused_loss", dies_in_step_5)
    with pytest.raises(MonomodError, match="killed mid-job"):
        execute(plan, killed, only=[FUSED])
    monkeypatch.setattr(fused_runtime, "fused_loss", original)
    execute(plan, killed)
    result = json.loads((killed / "jobs" / FUSED / "result.json").read_text())
    assert result["resumed_from"] == 3
    for name, ours in _products(killed, members).items():
        _assert_equal(ours, _products(reference, [name])[name], name)
    assert json.loads((killed / "report.json").read_text())["modules"][0]["student_hybrid_acc"] is not None


def test_the_meta_suffix_runs_each_stream_as_alone_whatever_its_shape():
    """``suffixes`` batches the streams that reached a stage; a stream of another token count (a NAC's latents
    against the teacher's tokens) runs in its own batch; the last module has no suffix; ``prefixes`` runs each
    stage once."""
    torch.manual_seed(0)
    stages = [torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8), torch.nn.GELU()) for _ in range(4)]
    starts = [0, 1, 2, 3]
    features = [torch.randn(5, 3 if k % 2 else 4, 8) for k in starts]
    alone = []
    for i, x in zip(starts, features):
        for stage in stages[i + 1:]:
            x = stage(x)
        alone.append(x)
    for ours, theirs in zip(fused_runtime.suffixes(stages, starts, features), alone):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    calls = {"n": 0}
    counted = [torch.nn.Sequential(stage) for stage in stages]
    for stage in counted:
        stage.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    x = torch.randn(5, 4, 8)
    contexts = fused_runtime.prefixes(counted, x, starts)
    assert calls["n"] == 3 and torch.equal(contexts[0], x)
    torch.testing.assert_close(contexts[3], stages[2](stages[1](stages[0](x))))
