"""Recipes: every shipped one loads and dry-runs; bad keys and values are one-line errors naming file and key;
command-line options and --set override a recipe; the plan pass honours budget overrides."""
import json

import pytest
from click.testing import CliRunner

import monomod
from monomod.cli import cli
from monomod.compiler import ConvertOptions
from monomod.passes.schedule import DataInfo
from plan_helpers import compile_plan
from monomod.recipes import load_recipe, parse_sets, recipe_names

SHIPPED = ["demo-moe-digits", "demo-nac-digits", "paper-nac-tinyimagenet", "paper-vmoe-imagenet", "vit_base-nac8"]


def convert(*args):
    return CliRunner().invoke(cli, ["convert", *args])


def test_shipped_recipes_are_listed_and_shown():
    assert recipe_names() == SHIPPED
    listed = CliRunner().invoke(cli, ["recipes", "list", "--format", "json"])
    assert listed.exit_code == 0 and [r["name"] for r in json.loads(listed.output)] == SHIPPED
    shown = CliRunner().invoke(cli, ["recipes", "show", "paper-vmoe-imagenet"])
    assert shown.exit_code == 0 and "student_preset: vmoe_base" in shown.output and "# m2mKD" in shown.output


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_recipe_dry_runs(name):
    recipe = load_recipe(name)
    result = convert("--recipe", name, "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    s = plan["settings"]
    assert (s["teacher"], s["student"], s["modules"]) == (recipe.values["teacher"], recipe.values["student"], recipe.values["modules"])
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert len([n for n in jobs if n.startswith("m2mkd:")]) == s["modules"]
    if name.startswith("paper-"):  # no data folder here: planned from the declared data facts, with a note
        assert "data loading skipped" in result.stderr
        assert s["preset"] == "paper" and jobs["meta"]["config"]["width"] == recipe.values["meta_width"]
        per_epoch = -(-recipe.values["data_info"]["train_size"] // 512)
        assert jobs["m2mkd:0"]["config"]["train"]["steps"] == 100 * per_epoch
        assert jobs["m2mkd:0"]["config"]["train"]["lr"] == 5e-4 and jobs["m2mkd:0"]["config"]["stitch"] == recipe.values["stitch"]


def test_paper_recipes_carry_the_reference_setups():
    nac = load_recipe("paper-nac-tinyimagenet").values
    assert (nac["teacher"], nac["modules"], nac["student_preset"], nac["img_size"], nac["meta_width"], nac["stitch"]) == (
        "vit_huge", 10, "tinyimagenet", 224, 1280, "linear")
    assert nac["data"] == "imagefolder:data/tiny-imagenet-200" and nac["ood"] == "imagefolder:data/tiny-imagenet-r"
    assert nac["budgets"]["finetune"]["epochs"] == 400 and nac["budgets"]["m2mkd"]["epochs"] == 100
    vmoe = load_recipe("paper-vmoe-imagenet").values
    assert (vmoe["teacher"], vmoe["student"], vmoe["modules"], vmoe["student_preset"], vmoe["meta_width"], vmoe["stitch"]) == (
        "vit_large", "moe", 4, "vmoe_base", 1024, "ln_linear")


@pytest.mark.parametrize("text, key, allowed", [
    ("description: x\nteacher: vit_tiny\nstudent: nac\nmodules: 4\nalpah: 0.3\n", "unknown key 'alpah'", "allowed keys"),
    ("description: x\nteacher: vit_tiny\nstudent: cnn\nmodules: 4\n", "student: 'cnn' is not allowed", "nac, moe, vit"),
    ("description: x\nteacher: vit_tiny\nstudent: nac\nmodules: four\n", "modules: 'four'", "an integer >= 2"),
    ("description: x\nteacher: vit_tiny\nstudent: nac\nmodules: 4\nbudgets: {m2mkd: {epoch: 3}}\n", "budgets.m2mkd.epoch", "steps, epochs"),
    ("description: x\nteacher: vit_tiny\nstudent: nac\nmodules: 4\nbudgets: {m2mkd: {steps: -3}}\n", "budgets.m2mkd.steps=-3", "integer"),
    ("description: x\nteacher: vit_tiny\nstudent: nac\nmodules: 4\nstudent_preset: huge\n", "student_preset: 'huge'", "small"),
    ("teacher: vit_tiny\nstudent: nac\nmodules: 4\n", "missing key(s) description", "every recipe sets"),
])
def test_malformed_recipe_is_one_line_naming_file_and_key(tmp_path, text, key, allowed):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(monomod.MonomodError, match="broken.yaml"):
        load_recipe(path)
    result = convert("--recipe", str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "broken.yaml" in lines[0] and key in lines[0] and allowed in lines[0], lines


def test_set_and_explicit_options_override_the_recipe():
    result = convert("--recipe", "demo-nac-digits", "--modules", "5", "--alpha", "0.2", "--set", "alpha=0.7",
                     "--set", "budgets.m2mkd.steps=7", "--set", "stitch=ln_linear", "--dry-run", "--format", "json")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    jobs = {j["name"]: j for j in plan["jobs"]}
    assert plan["settings"]["modules"] == 5  # explicit option beats the recipe's 4
    assert jobs["m2mkd:0"]["config"]["loss"]["alpha"] == 0.7  # --set beats the explicit --alpha
    assert jobs["m2mkd:4"]["config"]["train"]["steps"] == 7 and jobs["finetune"]["config"]["train"]["steps"] == 800
    assert jobs["m2mkd:0"]["config"]["stitch"] == "ln_linear"
    bad = convert("--recipe", "demo-nac-digits", "--set", "kd=medium", "--dry-run")
    assert bad.exit_code == 2 and "--set: kd: 'medium' is not allowed" in bad.output
    bad = convert("--recipe", "demo-nac-digits", "--set", "nonsense", "--dry-run")
    assert bad.exit_code == 2 and "is not key=value" in bad.output
    assert convert("--recipe", "no-such-recipe").exit_code == 2
    assert "needs MODEL, --to, --modules" in convert("--dry-run").output
    assert parse_sets(["budgets.meta.lr=1e-3"], {"budgets": {"meta": {"steps": 3}}}) == {"budgets": {"meta": {"steps": 3, "lr": 1e-3}}}


def test_plan_honours_budget_overrides():
    data = DataInfo(num_classes=10, in_chans=3, train_size=1000)
    base = dict(teacher="vit_tiny", student="nac", modules=3, img_size=32, teacher_training="end-to-end")
    plan = compile_plan(ConvertOptions(**base, budgets={"m2mkd": {"steps": 50, "lr": 2e-3}, "finetune": {"epochs": 2, "batch_size": 100}}), data)
    m2mkd, finetune = plan.job("m2mkd:1").config["train"], plan.job("finetune").config["train"]
    assert (m2mkd["steps"], m2mkd["lr"], m2mkd["warmup_steps"]) == (50, 2e-3, 5)  # demo warm-up: 10 % of the steps
    assert (finetune["steps"], finetune["batch_size"]) == (20, 100)  # 2 epochs of 1000 / 100
    assert plan.job("baseline").config["train"] == finetune  # the baseline keeps the fine-tune budget
    assert plan.job("teacher").config["train"]["steps"] == 800  # untouched kinds keep the preset's
    with pytest.raises(monomod.MonomodError, match="both steps and epochs"):
        compile_plan(ConvertOptions(**base, budgets={"meta": {"steps": 1, "epochs": 1}}), data)
    with pytest.raises(monomod.MonomodError, match="unknown job kind 'baseline'"):
        compile_plan(ConvertOptions(**base, budgets={"baseline": {"steps": 1}}), data)
