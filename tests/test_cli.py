import json

import pytest
from click.testing import CliRunner
from safetensors.torch import save_file

from monomod.cli import cli


def run(*args):
    return CliRunner().invoke(cli, list(args))


def test_inspect_table():
    result = run("inspect", "vit_tiny", "--img-size", "32", "--modules", "4")
    assert result.exit_code == 0, result.output
    assert "balance" in result.output and "blocks.3-5" in result.output and "B×5×192" in result.output


def test_inspect_reports_the_optimum_and_says_when_it_misses_the_tolerance():
    result = run("inspect", "vit_tiny", "--img-size", "32", "--modules", "4", "--format", "json")
    data = json.loads(result.output)
    assert data["method"] == "optimal" and data["optimum"] == data["balance"] > 1 and data["legal_cut_points"] > 12
    within = run("inspect", "vit_tiny", "--img-size", "32", "--modules", "4")
    assert f"optimum {data['optimum']:.3f} over {data['legal_cut_points']} legal cut points" in " ".join(within.output.split())
    assert "no 4-module cut" not in within.output
    strict = run("inspect", "vit_tiny", "--img-size", "32", "--modules", "4", "--tolerance", "0")
    assert strict.exit_code == 0, strict.output
    best = json.loads(run("inspect", "vit_tiny", "--img-size", "32", "--modules", "4", "--tolerance", "0",
                          "--format", "json").output)
    assert best["optimum"] <= data["optimum"] and best["single_tensor_optimum"] == data["optimum"]
    assert f"no 4-module cut of vit_tiny balances flops within 1.00: the optimum over its {best['legal_cut_points']} " \
        f"legal cut points is {best['optimum']:.3f}" in " ".join(strict.output.split())


def test_inspect_json_dot_and_html(tmp_path):
    dot, page = tmp_path / "p.dot", tmp_path / "p.html"
    result = run("inspect", "deit_small", "--img-size", "32", "-k", "3", "--format", "json", "--dot", str(dot), "--html", str(page))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert {"model", "params", "flops", "balance", "modules"} <= data.keys()
    assert data["model"] == "deit_small" and len(data["modules"]) == 3
    first = data["modules"][0]
    assert {"index", "params", "flops", "nodes", "inputs", "outputs"} <= first.keys()
    assert first["inputs"] == [{"name": "x", "shape": ["B", 3, 32, 32], "dtype": "float32", "bytes": 3 * 32 * 32 * 4}]
    assert first["outputs"][0]["shape"] == ["B", 5, 384]
    text = dot.read_text()
    assert text.startswith("digraph") and all(f"subgraph cluster_{i}" in text for i in range(3))
    assert "color=red" in text  # the cut edges
    html = page.read_text()
    assert 'id="monomod-data"' in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")  # offline


def test_inspect_manual_cuts_and_params_cost():
    result = run("inspect", "vit_tiny", "--img-size", "32", "--cuts", "blocks.6", "--cost", "params", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["method"] == "manual" and data["cost"] == "params" and len(data["modules"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["vit_bse"], "unknown model 'vit_bse'"),
        (["vit_tiny", "--modules", "0"], "--modules must be at least 1"),
        (["vit_tiny", "--img-size", "32", "--modules", "5000"], "more modules than"),
        (["vit_tiny", "--img-size", "8"], "cannot take an input"),
        (["vit_tiny", "--weights", "/no/such/file.safetensors"], "does not exist"),
        (["vit_tiny", "--img-size", "32", "--cuts", "blocks.99"], "matches no module"),
        (["tests.test_trace:_DataDependent"], "cannot trace"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, message):
    result = run("inspect", *args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_corrupt_and_mismatched_weights(tmp_path):
    corrupt = tmp_path / "w.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    result = run("inspect", "vit_tiny", "--weights", str(corrupt))
    assert result.exit_code == 2 and "cannot read weights file" in result.output
    import timm

    wrong = tmp_path / "resnet.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(wrong))
    result = run("inspect", "vit_tiny", "--weights", str(wrong))
    assert result.exit_code == 2 and "does not fit the model" in result.output


def test_help_shows_examples():
    result = run("inspect", "--help")
    assert result.exit_code == 0 and "monomod inspect vit_base --modules 8" in result.output
