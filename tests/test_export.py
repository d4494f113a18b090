"""ONNX export: a tiny run's student stages, student and teacher modules, and a model's modules, checked with
onnxruntime at two batch sizes (dynamic batch, parameters inside, metadata)."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from monomod.cli import cli
from monomod.passes import export as ex
from monomod.api import load_run, run_exportables
from monomod.runtime.execute import execute, prepare_run_dir
from plan_helpers import tiny_plan

# Which student each run exports, and the jobs that must have run for it (export reads their products).
SOURCES = {"nac": "assemble", "moe": "finetune"}


def _tiny_run(root: Path, student: str, modules: int, **kwargs) -> Path:
    plan = tiny_plan(student=student, modules=modules, meta="teacher", steps=2, **kwargs)
    run_dir = prepare_run_dir(plan, root / f"run-{student}")
    needed = ["teacher", *(f"m2mkd:{i}" for i in range(modules)), "assemble"]
    execute(plan, run_dir, only=needed + (["finetune"] if SOURCES[student] == "finetune" else []))
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("export-runs")
    return {
        "nac": _tiny_run(root, "nac", 3),
        # a capacity factor so the exported graph has to compute the expert capacity from the batch
        "moe": _tiny_run(root, "moe", 2, student_overrides={"gate": "vmoe", "capacity_factor": 1.25}),
    }


def _props(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("student", ["nac", "moe"])
def test_run_export_stages_student_and_teacher(runs, tmp_path, student):
    run_dir = runs[student]
    what = "all" if student == "nac" else "stages,student"  # teacher modules once is enough (same teacher)
    items = run_exportables(run_dir, ex.parse_what(what), source=SOURCES[student])
    k = 3 if student == "nac" else 2
    teacher = [f"teacher_{i}" for i in range(k)] if student == "nac" else []
    assert [i.name for i in items] == [*(f"stage_{i}" for i in range(k)), "student", *teacher]
    results = ex.export_all(items, tmp_path)
    assert all(r.ok and r.exporter == "dynamo" and r.max_diff <= 1e-4 for r in results), [r.to_json() for r in results]
    for item, result in zip(items, results):
        model = onnx.load(str(result.path))
        inputs = [i.name for i in model.graph.input]
        assert inputs == [s.name for s in item.inputs]  # parameters are initializers, never graph inputs
        assert not {i.name for i in model.graph.initializer} & set(inputs) and len(model.graph.initializer) > 0
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
        props = _props(result.path)
        assert props["monomod_version"] and json.loads(props["inputs"])[0]["shape"][0] == "B"
        assert props["kind"] in ("student_stage", "student", "teacher_module")
        if props["kind"] != "student":
            assert int(props["index"]) == int(item.name.split("_")[1])
    stage_props = _props(tmp_path / "stage_1.onnx")
    assert json.loads(stage_props["interface"])["kind"] in ("tokens->tokens", "tokens->logits")
    assert json.loads((tmp_path / "export.json").read_text())["files"][0]["name"] == "stage_0"

    # The stage files chain, by boundary name, into the deployed student (raw [0, 1] images) at other batch sizes.
    deployed = load_run(run_dir).student(SOURCES[student])
    sessions = [ort.InferenceSession(str(tmp_path / f"stage_{i}.onnx")) for i in range(k)]
    student_session = ort.InferenceSession(str(tmp_path / "student.onnx"))
    for batch in (1, 3):
        images = torch.rand(batch, *deployed.input_size)
        h = ((images - deployed.mean) / deployed.std).numpy()
        for s in sessions:
            h = s.run(None, {s.get_inputs()[0].name: h})[0]
        whole = student_session.run(None, {"images": images.numpy()})[0]
        with torch.no_grad():
            expected = deployed(images).numpy()
        assert np.abs(h - expected).max() <= 1e-4 and np.abs(whole - expected).max() <= 1e-4


def test_export_cli_run_dir_latency_and_exit_1_on_a_diff(runs, tmp_path, monkeypatch):
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # every diff now "exceeds" it
    result = CliRunner().invoke(cli, ["export", str(runs["moe"]), "--onnx", str(tmp_path), "--what", "student",
                                      "--format", "json", "--bench", "1,4", "--repeats", "2"])
    assert result.exit_code == 1 and "differ from torch" in result.stderr, result.output
    [entry] = json.loads(result.stdout)["files"]
    assert entry["file"] == "student.onnx" and not entry["ok"] and entry["max_diff"] <= 1e-4
    assert set(entry["latency_ms"]) == {"1", "4"} and set(entry["latency_ms"]["4"]) == {"onnxruntime", "torch"}


def small_vit(**kwargs) -> torch.nn.Module:
    """A 4-block timm ViT: the same graph as any ViT, exported in a fraction of vit_tiny's time."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2,
                                "num_classes": 10, **kwargs})


def test_export_model_modules_cli(tmp_path):
    result = CliRunner().invoke(cli, ["export", "test_export:small_vit", "--modules", "2", "--img-size", "32",
                                      "--onnx", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["files"]
    assert [f["file"] for f in files] == ["teacher_0.onnx", "teacher_1.onnx"] and all(f["ok"] for f in files)
    first, second = (onnx.load(str(tmp_path / f["file"])) for f in files)
    assert first.graph.output[0].name == second.graph.input[0].name  # pipeline stages fit together by name
    props = _props(tmp_path / "teacher_1.onnx")
    assert props["kind"] == "teacher_module" and props["index"] == "1" and json.loads(props["outputs"])[0]["shape"] == ["B", 10]


@pytest.mark.parametrize("args, message", [
    (["vit_tiny", "--img-size", "32"], "needs --modules"),
    (["vit_tiny", "--modules", "2", "--what", "stages"], "needs a RUN_DIR"),
    (["{run}", "--modules", "2"], "apply to a MODEL"),
    (["{run}", "--what", "weights"], "unknown --what"),
    (["{empty}"], "without plan.yaml"),
])
def test_export_cli_bad_input(runs, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    args = [a.format(run=runs["nac"], empty=tmp_path / "empty") for a in args]
    result = CliRunner().invoke(cli, ["export", *args, "--onnx", str(tmp_path / "out")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1
