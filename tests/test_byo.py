"""Students a user brings (timm names, pkg.module:factory), stitch layers chosen from boundary shapes, and CNN and
hierarchical teachers end to end (issue 12, items 3-4)."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch
from torch import nn

from monomod.errors import MonomodError
from monomod.frontend import check_trusted
from monomod.compiler import ConvertOptions
from monomod.passes.stitch import Stitch, layout, stitch_layer
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.students import build_student
from monomod.students.base import ModuleStage
from monomod.students.custom import check_student_kind

B = 2

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn
    from monomod.students.base import Stage, StagedModel, StageInterface

    def small_cnn(num_classes, in_chans=3, width=16):
        """A plain nn.Module: monomod cuts it into stages."""
        def block(c_in, c_out):
            return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())
        return nn.Sequential(block(in_chans, width), block(width, 2 * width), block(2 * width, 4 * width),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, num_classes))

    class Pool(Stage):
        def __init__(self, in_chans):
            super().__init__()
            self.interface = StageInterface("image->tokens", None, 8)
            self.proj = nn.Linear(in_chans, 8)

        def forward(self, x):
            return self.proj(x.mean(dim=(2, 3)))  # a pooled vector: no stitch joins it to tokens

    class Head(Stage):
        def __init__(self, num_classes):
            super().__init__()
            self.interface = StageInterface("tokens->logits", 8, None)
            self.fc = nn.Linear(8, num_classes)

        def forward(self, x):
            return self.fc(x)

    def pooled(modules, num_classes, img_size, in_chans):
        """A StagedModel: used as it is."""
        return StagedModel([Pool(in_chans), Head(num_classes)], num_classes=num_classes, img_size=img_size,
                           in_chans=in_chans)
''')


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "byo_students.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "byo_students"


# --- stitch choice (fast) ------------------------------------------------------------------------------------------
def test_tokens_to_tokens_is_a_linear_over_channels():
    layer = stitch_layer((5, 192), (5, 64))
    assert isinstance(layer, nn.Linear) and layer(torch.randn(B, 5, 192)).shape == (B, 5, 64)
    assert isinstance(stitch_layer((5, 64), (5, 64)), nn.Identity)
    assert isinstance(stitch_layer((5, 192), (5, 64), "ln_linear")[0], nn.LayerNorm)
    assert isinstance(stitch_layer((24, 64), (5, 192)), nn.Linear)  # a token set (NAC latents) keeps its count


def test_maps_to_maps_is_a_1x1_conv_with_spatial_resampling():
    down = stitch_layer((64, 8, 8), (32, 4, 4))
    assert isinstance(down, Stitch) and down.proj.kernel_size == (1, 1)
    assert down(torch.randn(B, 64, 8, 8)).shape == (B, 32, 4, 4)
    assert stitch_layer((64, 2, 2), (32, 4, 4))(torch.randn(B, 64, 2, 2)).shape == (B, 32, 4, 4)
    assert stitch_layer((8, 8, 96), (64, 4, 4))(torch.randn(B, 8, 8, 96)).shape == (B, 64, 4, 4)  # Swin: channels-last


def test_token_counts_and_layouts_are_resampled():
    assert layout((17, 32)).grid == (4, 4) and layout((17, 32)).prefix == 1
    x = torch.randn(B, 17, 32)
    assert stitch_layer((17, 32), (5, 64))(x).shape == (B, 5, 64)  # class token + 4x4 grid -> class token + 2x2
    assert stitch_layer((17, 32), (64, 8, 8))(x).shape == (B, 64, 8, 8)  # tokens -> map
    assert stitch_layer((64, 8, 8), (5, 192))(torch.randn(B, 64, 8, 8)).shape == (B, 5, 192)  # map -> tokens
    latents = stitch_layer((24, 64), (128, 4, 4))  # a token set of any count -> a map
    assert latents(torch.randn(B, 24, 64)).shape == latents(torch.randn(B, 64, 64)).shape == (B, 128, 4, 4)


def test_a_boundary_that_cannot_be_stitched_names_both_shapes():
    with pytest.raises(MonomodError, match="cannot stitch a B×10 boundary to a B×64×8×8 boundary"):
        stitch_layer((10,), (64, 8, 8))
    with pytest.raises(MonomodError, match="unknown stitch kind"):
        stitch_layer((5, 8), (5, 8), "conv")


def test_student_specs_and_trust(factory_module):
    for spec in ("nac", "deit_tiny", "deit_tiny_patch16_224", "resnet18", f"{factory_module}:small_cnn"):
        check_student_kind(spec)
    with pytest.raises(MonomodError, match="unknown student --to 'cnn'.*timm model name or pkg.module:factory"):
        check_student_kind("cnn")
    with pytest.raises(MonomodError, match="names Python code as its student.*--trust-code"):
        check_trusted({"student": f"{factory_module}:small_cnn"}, "recipe r.yaml", trust_code=False)
    check_trusted({"student": f"{factory_module}:small_cnn"}, "recipe r.yaml", trust_code=True)


def test_a_plain_module_is_cut_into_stages(factory_module):
    student = build_student(f"{factory_module}:small_cnn", modules=3, num_classes=10, img_size=32)
    assert len(student.stages) == 3 and all(isinstance(s, ModuleStage) for s in student.stages)
    assert student(torch.randn(B, 3, 32, 32)).shape == (B, 10)
    timm_student = build_student("deit_tiny", modules=4, num_classes=10, img_size=32)
    assert timm_student(torch.randn(B, 3, 32, 32)).shape == (B, 10)


def test_unstitchable_student_is_refused_at_compile_time(factory_module):
    options = ConvertOptions(teacher="vit_tiny", student=f"{factory_module}:pooled", modules=2, data="synthetic",
                             img_size=32)
    with pytest.raises(MonomodError, match="cannot stitch a B×5×192 boundary to a B×8 boundary"):
        compile_options(options)


# --- end to end (slow) ----------------------------------------------------------------------------------------------
def _run(tmp_path, teacher, student, modules, img_size, steps=2, **kwargs):
    options = ConvertOptions(teacher=teacher, student=student, modules=modules, data="synthetic", img_size=img_size,
                             **kwargs)
    plan = compile_options(options)
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=steps, batch_size=8, warmup_steps=1)
    plan.rehash()
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    for model in ("teacher", "student", "baseline"):
        assert 0.0 <= report[model]["iid_acc"] <= 1.0
    assert [m["module"] for m in report["modules"]] == list(range(modules))
    return run_dir, report


@pytest.mark.slow
def test_convert_into_a_timm_student(tmp_path):
    """vit_tiny -> deit_tiny_patch16_224 (a timm model cut by monomod's passes), 32 px, K=4."""
    _run(tmp_path, "vit_tiny", "deit_tiny_patch16_224", 4, 32, teacher_training="end-to-end")


@pytest.mark.slow
def test_convert_into_a_factory_student(tmp_path, factory_module):
    """A plain CNN from pkg.module:factory under a ViT teacher: map stages stitched to token boundaries."""
    _run(tmp_path, "vit_tiny", f"{factory_module}:small_cnn", 3, 32, teacher_training="end-to-end")


@pytest.mark.slow
@pytest.mark.parametrize("teacher, img_size", [("resnet18", 32), ("convnext_nano", 32),
                                               ("swin_tiny_patch4_window7_224", 56)])
def test_cnn_and_hierarchical_teachers(tmp_path, teacher, img_size):
    """Deep Incubation in a meta model that follows the teacher's feature maps, then a ViT student stitched to
    them. Swin at 56 px: K=4 cuts there on single channels-last maps (the window shrinks to the grid)."""
    run_dir, _ = _run(tmp_path, teacher, "vit", 4, img_size)
    from monomod.runtime.jobs import RunContext
    from monomod.plan import Plan

    ctx = RunContext(run_dir=run_dir, plan=Plan.load(run_dir))
    assert type(ctx.meta().stages[1]).__name__ == "MetaMapStage"


def test_a_cut_the_trained_meta_model_cannot_follow_is_refused_at_compile_time():
    """A cut inside a residual block passes two tensors: refused by the compile stage, not by the meta job."""
    options = ConvertOptions(teacher="resnet18", student="vit", modules=4, data="synthetic", img_size=32,
                             cuts=["layer1.1", "layer2.1", "layer3.1.conv2"])
    with pytest.raises(MonomodError, match=r"teacher cut at layer1.1, layer2.1, layer3.1.conv2: .*two|outputs") as e:
        compile_options(options)
    assert "\n" not in str(e.value) and "--meta teacher" in str(e.value)
    with pytest.raises(MonomodError, match="cannot stitch a multi-value boundary"):  # the stitch check sees the cuts
        compile_options(ConvertOptions(teacher="resnet18", student="vit", modules=4, data="synthetic", img_size=32,
                                       meta="teacher", teacher_training="end-to-end",
                                       cuts=["layer1.1", "layer2.1", "layer3.1.conv2"]))
