"""The partition explorer: its data (parsed the way a browser parses it), the cut points it offers, its layout, the
Model Explorer files, a run's report.html, and the page itself in headless Chromium (skipped without a browser)."""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from monomod.cli import cli
from monomod.explorer import explorer_html, model_explorer_files, page_data
from monomod.explorer.layout import layered_layout
from monomod.explorer.page import block_paths
from monomod.explorer.records import drawn_nodes
from monomod.passes.partition import cut_points, partition
from tests.headless import Chromium, find_browser


class _ScriptText(HTMLParser):
    """The raw text of one <script> element, as an HTML parser hands it to the browser's JS (no entity decoding)."""

    def __init__(self, element_id: str) -> None:
        super().__init__()
        self.element_id, self.inside, self.text = element_id, False, None

    def handle_starttag(self, tag, attrs):
        self.inside = tag == "script" and dict(attrs).get("id") == self.element_id

    def handle_data(self, data):
        if self.inside:
            self.text = (self.text or "") + data

    def handle_endtag(self, tag):
        self.inside = False


def embedded_data(page: str) -> dict:
    parser = _ScriptText("monomod-data")
    parser.feed(page)
    assert parser.text is not None, "no monomod-data script"
    return json.loads(parser.text)


def test_embedded_json_survives_script_breakers(traced_models):
    """Names with </script>, <!-- and & travel intact: JSON.parse of the script text gives the data back."""
    traced = dataclasses.replace(traced_models["vit"], name='vit</script><!--<script>alert("x")</script>&amp;')
    part = partition(traced, 2)
    page = explorer_html(part)
    assert page.count("</script>") == 2  # the data's own and the code's; none from the name
    assert embedded_data(page) == json.loads(json.dumps(page_data(part)))
    assert embedded_data(page)["model"] == traced.name


@pytest.mark.parametrize("family", ["vit", "resnet", "swin"])
def test_every_cut_point_replays_through_cuts(traced_models, family):
    """Each point the page offers is a --cuts name that starts module 1 at that very node."""
    traced = traced_models[family]
    points = cut_points(traced)
    names = list(traced.nodes)
    assert points and all(names.index(node) > 0 for node in points)
    for node, label in list(points.items())[:: max(1, len(points) // 12)]:
        part = partition(traced, cuts=[label])
        first = next(n for n in names if part.assignment[n] == 1)
        assert names.index(first) <= names.index(node) and part.assignment[node] == 1, (node, label)
        assert all(part.assignment[n] == 0 for n in names[: names.index(node)] if n in points), (node, label)


def test_block_level_collapse():
    resnet = ["conv1", "layer1.0.conv1", "layer1.0.bn1", "layer2.0.conv1", "layer2.0.downsample.0", "layer2.0.downsample.1"]
    assert block_paths(resnet) == ["layer1.0", "layer2.0"]
    swin = ["patch_embed.proj", "patch_embed.norm", "layers.1.downsample.norm", "layers.1.downsample.reduction",
            "layers.1.blocks.0.attn.qkv", "layers.1.blocks.0.mlp.fc1", "norm"]
    assert block_paths(swin) == ["layers.1.blocks.0", "layers.1.downsample", "patch_embed"]


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_layout_goes_down_along_the_data(traced_models, family):
    traced = traced_models[family]
    drawn = drawn_nodes(traced)
    layout = layered_layout(traced, drawn)
    keep = set(drawn)
    for node in traced.graph_module.graph.nodes:
        for arg in node.all_input_nodes:
            if node.name in keep and arg.name in keep:
                assert layout[arg.name][1] < layout[node.name][1], (arg.name, node.name)


def test_page_reference_figures_equal_the_cli(traced_models):
    part = partition(traced_models["vit"], 4)
    data = page_data(part)
    labels = [data["nodes"]["cut"][i] for i in data["cuts"]]
    replay = partition(traced_models["vit"], cuts=labels)
    assert data["reference"]["flops"] == [m.flops for m in replay.modules]
    assert data["reference"]["bytes_cut"] == replay.bytes_cut


def test_inspect_json_has_nodes_and_edges():
    result = CliRunner().invoke(cli, ["inspect", "vit_tiny", "--img-size", "32", "-k", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    node = next(n for n in data["nodes"] if n["name"] == "blocks_0_attn_qkv")
    assert node == {"name": "blocks_0_attn_qkv", "op": "call_module", "target": "blocks.0.attn.qkv",
                    "module_path": "blocks.0.attn.qkv", "shape": ["B", 5, 576], "dtype": "float32",
                    "flops": node["flops"], "params": 192 * 576 + 576, "bytes": 5 * 576 * 4, "module": 0}
    assert node["flops"] > 0 and {n["module"] for n in data["nodes"]} == {0, 1, 2}
    names = {n["name"] for n in data["nodes"]}
    producers = [src for src, dst in data["edges"] if dst == "blocks_0_attn_qkv"]
    by_name = {n["name"]: n for n in data["nodes"]}
    assert [by_name[p]["module_path"] for p in producers] == ["blocks.0.norm1"]
    assert all(set(e) <= names for e in data["edges"])
    assert sum(n["flops"] for n in data["nodes"]) == data["flops"]


def test_model_explorer_files(tmp_path, traced_models):
    result = CliRunner().invoke(cli, ["inspect", "vit_tiny", "--img-size", "32", "-k", "3", "--format",
                                      "model-explorer", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    graph = json.loads((tmp_path / "vit_tiny.graph.json").read_text())
    assert graph["label"] == "vit_tiny" and len(graph["graphs"]) == 1
    nodes = {n["id"]: n for n in graph["graphs"][0]["nodes"]}
    assert nodes["blocks_0_attn_qkv"]["namespace"] == "blocks/0/attn" and nodes["blocks_0_attn_qkv"]["label"] == "qkv"
    sources = [e["sourceNodeId"] for e in nodes["blocks_0_attn_qkv"]["incomingEdges"]]
    assert [nodes[s]["namespace"] for s in sources] == ["blocks/0/norm1"]
    modules = json.loads((tmp_path / "vit_tiny.modules.json").read_text())["vit_tiny"]
    assert set(modules["results"]) == set(nodes) and {r["value"] for r in modules["results"].values()} == {0, 1, 2}
    flops = json.loads((tmp_path / "vit_tiny.flops.json").read_text())["vit_tiny"]
    assert flops["results"]["blocks_0_attn_qkv"]["value"] > 0
    assert set(model_explorer_files(partition(traced_models["vit"], 2))) == {"graph.json", "modules.json", "flops.json"}


# ------------------------------------------------------------------------------------------------ in a browser

BROWSER = find_browser()
needs_browser = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")

# (CLI model and size, a node the search must find): a ViT, a Swin and a ResNet, small enough to trace quickly.
PAGES = {
    "vit": (["vit_tiny", "--img-size", "32"], "blocks_5_attn_qkv"),
    "swin": (["swin_tiny_patch4_window7_224"], "layers_2_blocks_3_attn_qkv"),
    "resnet": (["resnet18", "--img-size", "64"], "layer3_1_conv2"),
}


@pytest.fixture(scope="module")
def browser():
    try:
        b = Chromium()
    except (OSError, RuntimeError, TimeoutError) as e:
        pytest.skip(f"Chromium did not start: {e}")
    with b:
        yield b


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = {}
    for family, (args, _) in PAGES.items():
        page = tmp_path_factory.mktemp("pages") / f"{family}.html"
        result = CliRunner().invoke(cli, ["inspect", *args, "-k", "4", "--html", str(page)])
        assert result.exit_code == 0, result.output
        out[family] = page
    return out


def _open(browser, page: Path) -> None:
    browser.load(page)
    browser.wait_for("window.monomodRendered")


@needs_browser
@pytest.mark.parametrize("family", PAGES)
def test_page_loads_searches_and_collapses(browser, pages, family):
    _open(browser, pages[family])
    assert browser.console_errors() == []
    node = PAGES[family][1]
    assert browser.eval(f"monomod.search({json.dumps(node)})") >= 1
    browser.eval("monomod.nextMatch()")
    assert browser.eval("monomod.selected()") == node
    centre, where = browser.eval("monomod.centre()"), browser.eval(f"monomod.itemPosition({json.dumps(node)})")
    assert abs(centre["x"] - where["x"]) < 1 and abs(centre["y"] - where["y"]) < 1  # revealed and centred
    browser.eval("monomod.collapseToBlocks()")
    blocks = browser.eval("monomod.visibleCount()")
    browser.eval("monomod.expandAll()")
    expanded = browser.eval("monomod.visibleCount()")
    browser.eval("monomod.collapseAll()")
    assert browser.eval("monomod.visibleCount()") < blocks < expanded
    assert browser.console_errors() == []


@needs_browser
@pytest.mark.parametrize("family", PAGES)
def test_moved_cuts_give_the_cli_figures(browser, pages, family):
    """Move the first cut down and the last one up with the page's own buttons, then ask the CLI for those cuts."""
    _open(browser, pages[family])
    before = browser.eval("monomod.figures()")
    browser.eval("document.querySelector('button[data-cut=\"0\"][data-dir=\"1\"]').click()")
    browser.eval("document.querySelector('button[data-cut=\"2\"][data-dir=\"-1\"]').click()")
    after = browser.eval("monomod.figures()")
    assert after["cuts"] != before["cuts"]
    result = CliRunner().invoke(cli, ["inspect", *PAGES[family][0], "--cuts", after["cuts_arg"], "--format", "json"])
    assert result.exit_code == 0, result.output
    cli_data = json.loads(result.output)
    assert after["flops"] == [m["flops"] for m in cli_data["modules"]]
    assert after["params"] == [m["params"] for m in cli_data["modules"]]
    assert after["nodes"] == [m["nodes"] for m in cli_data["modules"]]
    assert after["bytes_cut"] == cli_data["bytes_cut"]
    assert round(after["balance"], 4) == cli_data["balance"]
    shown = browser.eval("document.querySelector('#figures').textContent")
    assert f"balance {cli_data['balance']:.3f}" in shown
    assert browser.eval("document.querySelector('#cuts-arg').value") == f"--cuts {after['cuts_arg']}"


@needs_browser
def test_dragging_a_cut_moves_it(browser, pages):
    """A real pointer drag on a cut handle (DevTools input events) moves the cut to a legal point."""
    _open(browser, pages["vit"])
    before = browser.eval("monomod.figures()")["cuts"]
    start = browser.eval("monomod.cutHandle(1)")
    target = browser.eval("monomod.screenOf('blocks.8')")
    for kind, (x, y) in (("mousePressed", start), ("mouseMoved", (start[0], target[1])), ("mouseReleased", (start[0], target[1]))):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=1 if kind != "mouseReleased" else 0,
                     clickCount=1)
    after = browser.eval("monomod.figures()")
    assert after["cuts"][0] == before[0] and after["cuts"][2] == before[2]
    assert after["cut_names"][1] == "blocks.8"


# ------------------------------------------------------------------------------------------------ a run's page


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A compiled 3-module plan with a report.json (numbers made up: the page is what is tested, not training)."""
    from monomod.runtime.execute import prepare_run_dir
    from plan_helpers import tiny_plan

    plan = tiny_plan(modules=3)
    run_dir = prepare_run_dir(plan, tmp_path_factory.mktemp("run") / "run")
    modules = [{"module": i, "teacher_hybrid_acc": 0.8 - i / 10, "incubated_hybrid_acc": 0.7, "student_hybrid_acc": 0.6,
                "agreement": 0.9} for i in range(3)]
    report = {"teacher": {"iid_acc": 0.81, "ood_acc": 0.5}, "student": {"iid_acc": 0.7, "ood_acc": 0.4},
              "modules": modules, "warnings": [], "jobs": {"teacher": {"seconds": 1.5}}, "total_seconds": 1.5,
              "settings": plan.settings}
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir, report


def test_report_html_redraws_a_runs_page(finished_run):
    run_dir, report = finished_run
    result = CliRunner().invoke(cli, ["report", str(run_dir), "--html"])
    assert result.exit_code == 0, result.output
    assert "teacher hybrid" in result.output and "report.html" in result.output
    data = embedded_data((run_dir / "report.html").read_text())
    assert data["run"]["modules"] == report["modules"] and data["k"] == 3
    assert [r["label"] for r in data["run"]["results"]] == ["teacher", "m2mKD student (assembled + fine-tuned)"]
    assert [c[0] for c in data["run"]["module_columns"]] == ["teacher_hybrid_acc", "incubated_hybrid_acc",
                                                             "student_hybrid_acc", "agreement"]
    missing = CliRunner().invoke(cli, ["report", str(run_dir.parent)])
    assert missing.exit_code == 2 and "no report.json" in missing.output


@needs_browser
def test_run_page_shows_hybrids_per_module(browser, finished_run):
    run_dir, _ = finished_run
    if not (run_dir / "report.html").exists():
        CliRunner().invoke(cli, ["report", str(run_dir), "--html"])
    _open(browser, run_dir / "report.html")
    assert browser.console_errors() == []
    chart = browser.eval("document.querySelector('#balance-chart').textContent")
    assert "80.0%" in chart and "70.0%" in chart and "60.0%" in chart  # teacher, incubated, student of module 0
    assert "teacher hybrid" in browser.eval("document.querySelector('section.run').innerText")
    browser.eval("monomod.stepCut(0, 1)")  # other cuts: the run's hybrids no longer apply
    assert "80.0%" not in browser.eval("document.querySelector('#balance-chart').textContent")


@pytest.mark.slow
@needs_browser
def test_model_explorer_opens_the_files_offline(tmp_path):
    """Model Explorer's own server and web app (the optional extra) load the graph and the module overlay."""
    server = Path(sys.executable).with_name("model-explorer")
    if not server.exists():
        pytest.skip("ai-edge-model-explorer is not installed (pip install 'monomod[model-explorer]')")
    result = CliRunner().invoke(cli, ["inspect", "vit_tiny", "--img-size", "32", "-k", "3", "--format",
                                      "model-explorer", "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(server), str(tmp_path / "vit_tiny.graph.json"), "--no_open_in_browser",
                             f"--node_data_paths={tmp_path / 'vit_tiny.modules.json'}", f"--port={port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        url = next(line.strip() for line in proc.stdout if line.startswith("http://localhost"))
        with Chromium(args=("--enable-unsafe-swiftshader", "--use-angle=swiftshader")) as browser:
            browser.load(url)
            nodes = sum(1 for n in json.loads((tmp_path / "vit_tiny.graph.json").read_text())["graphs"][0]["nodes"])
            browser.wait_for(f"document.body.innerText.includes('{nodes} nodes')", timeout=60)
            browser.wait_for("document.body.innerText.includes('monomod module (K=3)')", timeout=60)  # the overlay
            assert "blocks" in browser.eval("document.body.innerText")  # a namespace from the module paths
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@needs_browser
@pytest.mark.parametrize("family", ["vit", "swin", "resnet"])
def test_random_cuts_match_the_partition_pass(browser, traced_models, tmp_path, family):
    """The page's port of the cut rule against the partition pass, on random legal cuts (parameter reads and shape
    arithmetic recomputed across cuts included)."""
    import random

    traced = traced_models[family]
    page = tmp_path / "page.html"
    page.write_text(explorer_html(partition(traced, 4)))
    _open(browser, page)
    legal = browser.eval("monomod.legalPoints()")
    rng = random.Random(family)
    for k in (2, 3, 5, 8):
        cuts = sorted(rng.sample(legal, k - 1))
        assert browser.eval(f"monomod.setCuts({json.dumps(cuts)})")
        page_figures = browser.eval("monomod.figures()")
        expected = partition(traced, cuts=page_figures["cut_names"])
        assert page_figures["flops"] == [m.flops for m in expected.modules], cuts
        assert page_figures["params"] == [m.params for m in expected.modules], cuts
        assert page_figures["cut_bytes"] == [sum(v.bytes for v in cut) for cut in expected.cuts], cuts
    assert browser.console_errors() == []


@needs_browser
def test_clicks_expand_and_collapse(browser, pages):
    """A real click on a collapsed block opens it; a click on its frame's title closes it again."""
    _open(browser, pages["vit"])
    before = browser.eval("monomod.visibleCount()")
    _click(browser, browser.eval("monomod.screenOf('blocks.5')"))
    opened = browser.eval("monomod.visibleCount()")
    assert opened > before
    _click(browser, browser.eval("monomod.frameTitle('blocks.5')"))
    assert browser.eval("monomod.visibleCount()") == before


def _click(browser, at) -> None:
    x, y = at
    for kind, buttons in (("mousePressed", 1), ("mouseReleased", 0)):
        browser.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", buttons=buttons, clickCount=1)
