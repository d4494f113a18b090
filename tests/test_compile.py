"""The compile stage: one option spec, the partition recorded in plan.yaml and replayed by the jobs."""
import json

import pytest
import yaml
from click.testing import CliRunner

from monomod.cli import cli
from monomod.compiler import OPTIONS, ConvertOptions, compile_options
from monomod.errors import MonomodError
from monomod.plan import Plan
from monomod.recipes import SCHEMA
from monomod.runtime.execute import prepare_run_dir
from monomod.runtime.jobs import RunContext

TINY = ["vit_tiny", "--to", "vit", "--data", "synthetic", "--img-size", "32"]


def _convert(*args):
    return CliRunner().invoke(cli, ["convert", *TINY, *args])


def test_the_option_spec_makes_the_flags_and_the_recipe_schema():
    params = {p.name: p for p in cli.commands["convert"].params}
    for option in OPTIONS:
        assert option.flag is None or params[option.name].opts[-1] == option.flag, option.name
        assert option.name in SCHEMA  # every option is a recipe key
    assert params["alpha"].default == 0.5 and params["cost"].default == "flops"


def test_convert_records_the_cuts_in_plan_yaml_and_plan_show_shows_them(tmp_path):
    dry = _convert("--cuts", "blocks.2,blocks.7", "--dry-run", "--format", "json")
    assert dry.exit_code == 0, dry.output
    record = json.loads(dry.output)["settings"]["partition"]
    assert record["cuts"] == ["blocks.2", "blocks.7"] and record["cost"] == "flops" and record["balance"] > 1
    assert {j["name"] for j in json.loads(dry.output)["jobs"]} >= {"m2mkd:2"}  # K follows from the cuts
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=3, data="synthetic", img_size=32,
                                          cuts=["blocks.2", "blocks.7"], cost="params", tolerance=0.1))
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    saved = yaml.safe_load((run_dir / "plan.yaml").read_text())["settings"]["partition"]
    assert saved["cuts"] == ["blocks.2", "blocks.7"] and (saved["cost"], saved["tolerance"]) == ("params", 0.1)
    shown = CliRunner().invoke(cli, ["plan", "show", str(run_dir)])
    assert shown.exit_code == 0 and "cuts blocks.2, blocks.7 (cost params, tolerance 0.1" in shown.output
    assert "precision fp32, compile off" in shown.output  # how the training jobs run, as the plan records it


def test_searched_cuts_are_recorded_by_name():
    dry = _convert("-k", "3", "--tolerance", "0.5", "--dry-run", "--format", "json")
    record = json.loads(dry.output)["settings"]["partition"]
    assert len(record["cuts"]) == 2 and all(cut.startswith("blocks.") for cut in record["cuts"])
    assert record["tolerance"] == 0.5


def test_jobs_replay_the_recorded_cuts(tmp_path):
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=2, data="synthetic", img_size=32,
                                          cuts=["blocks.1"]))  # the search cuts a 12-block ViT near its middle
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    ctx = RunContext(run_dir=run_dir, plan=Plan.load(run_dir))
    assert ctx.partition().method == "manual" and "blocks.1" not in " ".join(ctx.partition().modules[0].covers)
    first = set(ctx._empty_module(0).state_dict())
    assert any(k.startswith("blocks.0.") for k in first) and not any(k.startswith("blocks.1.") for k in first)
    edited = yaml.safe_load((run_dir / "plan.yaml").read_text())
    edited["settings"]["partition"]["cuts"] = ["blocks.5"]
    (run_dir / "plan.yaml").write_text(yaml.safe_dump(edited, sort_keys=False))
    first = set(RunContext(run_dir=run_dir, plan=Plan.load(run_dir))._empty_module(0).state_dict())
    assert any(k.startswith("blocks.4.") for k in first) and not any(k.startswith("blocks.5.") for k in first)


@pytest.mark.parametrize("training, unchanged", [("incubate", {"baseline"}),
                                                 ("end-to-end", {"baseline", "teacher"})])
def test_editing_the_cuts_changes_the_hashes_of_the_jobs_that_use_them(training, unchanged):
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=3, data="synthetic", img_size=32,
                                          teacher_training=training))
    before = {j.name: j.hash for j in plan.jobs}
    edited = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    edited.settings["partition"].update(tolerance=0.9, balance=9.0, cost="params")  # how the cuts were found
    edited.rehash()
    assert {j.name: j.hash for j in edited.jobs} == before
    edited.settings["partition"]["cuts"] = ["blocks.3", "blocks.9"]
    edited.rehash()
    assert {name for name, h in before.items() if edited.job(name).hash == h} == unchanged


@pytest.mark.parametrize("args, message", [
    (["--cuts", "blocks.99"], "cut point 'blocks.99' matches no module"),
    (["--cuts", "blocks.6,blocks.3"], "not in forward order"),
    (["--cuts", "blocks.3", "-k", "4"], "1 cuts make 2 modules, not 4"),
    (["-k", "3", "--tolerance", "-1"], "--tolerance must be a number >= 0"),
    (["-k", "3", "--to", "cnn"], "unknown student --to 'cnn'"),
])
def test_bad_partition_options_are_refused_at_compile_time_in_one_line(args, message):
    result = _convert(*args, "--dry-run")
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output


def test_a_plan_without_a_recorded_partition_asks_for_a_recompile(tmp_path):
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=2, data="synthetic", img_size=32))
    del plan.settings["partition"]
    with pytest.raises(MonomodError, match="records no partition"):
        RunContext(run_dir=tmp_path, plan=plan).partition()


def test_precision_threads_and_compile_are_recorded_in_the_plan(monkeypatch):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)  # a CPU without native bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    auto = json.loads(_convert("-k", "2", "--dry-run", "--format", "json").output)
    trained = [job for job in auto["jobs"] if "train" in job["config"]]
    assert trained and all(job["config"]["train"]["precision"] == "fp32" for job in trained)  # the default
    assert all(job["config"]["train"]["compile"] is False for job in trained)
    assert auto["settings"]["threads"] is None  # asked for none: each job's executor allots it where it runs
    given = json.loads(_convert("-k", "2", "--precision", "bf16", "--compile", "--threads", "3", "--dry-run",
                                "--format", "json").output)
    assert given["settings"]["threads"] == 3
    assert all(job["config"]["train"]["precision"] == "bf16" and job["config"]["train"]["compile"]
               for job in given["jobs"] if "train" in job["config"])
    asked = json.loads(_convert("-k", "2", "--precision", "auto", "--dry-run", "--format", "json").output)
    assert {job["config"]["train"]["precision"] for job in asked["jobs"] if "train" in job["config"]} == {"auto"}
    assert _convert("-k", "2", "--precision", "fp16", "--dry-run").exit_code == 2


def test_one_compile_loads_traces_and_searches_the_teacher_once(monkeypatch):
    """One pass over the teacher: a compile loads it once, traces it once and searches its cuts once (the
    search's cut names are then replayed once, a manual cut, to check that the jobs will find the same modules)."""
    import monomod.frontend
    import monomod.passes.partition
    import monomod.passes.trace

    counts = {"load": 0, "trace": 0, "search": 0}
    load, trace, partition = (monomod.frontend.load_model, monomod.passes.trace.trace,
                              monomod.passes.partition.partition)

    def counting_load(spec, **kwargs):
        counts["load"] += spec == "vit_tiny"
        return load(spec, **kwargs)

    def counting_trace(*args, **kwargs):
        counts["trace"] += 1
        return trace(*args, **kwargs)

    def counting_partition(traced, modules=None, **kwargs):
        counts["search"] += not kwargs.get("cuts")
        return partition(traced, modules, **kwargs)

    monkeypatch.setattr(monomod.frontend, "load_model", counting_load)
    monkeypatch.setattr(monomod.passes.trace, "trace", counting_trace)
    monkeypatch.setattr(monomod.passes.partition, "partition", counting_partition)
    plan = compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=3, data="synthetic",
                                          img_size=32))
    assert counts == {"load": 1, "trace": 1, "search": 1}
    assert len(plan.settings["partition"]["cuts"]) == 2
    counts.update(load=0, trace=0, search=0)
    compile_options(ConvertOptions(teacher="vit_tiny", student="vit", modules=3, data="synthetic", img_size=32,
                                   cuts=["blocks.4", "blocks.8"]))
    assert counts == {"load": 1, "trace": 1, "search": 0}  # given cuts: no search at all
