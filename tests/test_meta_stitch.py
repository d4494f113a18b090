"""Meta model, stitch layers and the m2mKD hybrid, against a vit_tiny teacher at 32 px, 10 classes, K=4."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from click.testing import CliRunner
from torch import nn

from monomod import (
    MonomodError, build_meta, build_student, extract, hybrid, partition, stitch, trace,
)
from monomod.cli import cli

IMG, NC, B, K, D = 32, 10, 2, 4, 192


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=IMG, num_classes=NC).eval()


@pytest.fixture(scope="module")
def part(teacher):
    return partition(trace(teacher, torch.randn(1, 3, IMG, IMG)), K)


@pytest.fixture(scope="module")
def images():
    return torch.randn(B, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def _shapes(stages, x):
    """Output shape of every stage along the chain (batch axis as B)."""
    shapes = []
    with torch.no_grad():
        for stage in stages:
            x = stage(x)
            shapes.append(["B", *x.shape[1:]])
    return shapes


def _teacher_shapes(part):
    return [list(spec.outputs[0].shape) for spec in part.modules]


# --- meta model ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [None, 64])
def test_meta_boundaries_match_teacher(part, images, width):
    meta = build_meta(part, width).eval()
    assert len(meta.stages) == K
    assert _shapes(meta.stages, images) == _teacher_shapes(part) == [["B", 5, D]] * 3 + [["B", NC]]
    assert [i.kind for i in meta.interfaces] == ["image->tokens", "tokens->tokens", "tokens->tokens", "tokens->logits"]
    assert [(i.width_in, i.width_out) for i in meta.interfaces] == [(None, D), (D, D), (D, D), (D, None)]
    assert meta.meta_width == (width or D)
    if width:  # internal width differs: boundaries stay D through linear maps
        assert isinstance(meta.stages[1].proj_in, nn.Linear) and meta.stages[1].proj_in.out_features == width
    else:
        assert isinstance(meta.stages[1].proj_in, nn.Identity)


def test_teacher_module_replaces_meta_stage(part, images):
    meta = build_meta(part).eval()
    teacher_modules = extract(part)
    for i in range(K):
        stages = list(meta.stages)
        stages[i] = teacher_modules[i]
        assert _shapes(stages, images)[-1] == ["B", NC]


def test_teacher_as_meta_equals_teacher(teacher, part, images):
    meta = build_meta(part, kind="teacher")
    assert meta.meta_kind == "teacher"
    assert [(i.width_in, i.width_out) for i in meta.interfaces] == [(None, D), (D, D), (D, D), (D, None)]
    with torch.no_grad():
        torch.testing.assert_close(meta(images), teacher(images), rtol=0, atol=0)


def test_mean_pooling_without_prefix_tokens():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=IMG, num_classes=NC, class_token=False,
                            global_pool="avg").eval()
    meta = build_meta(partition(trace(vit, torch.randn(1, 3, IMG, IMG)), 2))
    assert meta.stages[0].prefix_tokens is None and meta.stages[-1].pool == "avg"
    assert meta(torch.randn(B, 3, IMG, IMG)).shape == (B, NC)


def test_cnn_partition_gets_a_map_meta_or_the_teacher_as_meta():
    cnn = timm.create_model("resnet18", pretrained=False, num_classes=NC).eval()
    cnn_part = partition(trace(cnn, torch.randn(1, 3, IMG, IMG)), 3)
    trained = build_meta(cnn_part)  # stages follow the teacher's feature maps
    x = torch.randn(B, 3, IMG, IMG)
    for stage, cut in zip(trained.stages, cnn_part.cuts):
        x = stage(x)
        assert list(x.shape[1:]) == cut[0].shape[1:]
    assert trained.stages[-1](x).shape == (B, NC)
    with pytest.raises(MonomodError, match="meta width applies to token boundaries"):
        build_meta(cnn_part, 64)
    meta = build_meta(cnn_part, kind="teacher")
    assert meta.interfaces[1].width_in is None  # not a token boundary: nothing to stitch to
    with torch.no_grad():
        assert meta(torch.randn(B, 3, IMG, IMG)).shape == (B, NC)


def test_bad_meta_arguments(part):
    with pytest.raises(MonomodError, match="unknown meta kind"):
        build_meta(part, kind="random")
    with pytest.raises(MonomodError, match="trained meta model only"):
        build_meta(part, 64, kind="teacher")


# --- stitch --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nac():
    torch.manual_seed(0)
    return build_student("nac", modules=K, num_classes=NC, img_size=IMG)  # width 64


@pytest.fixture(scope="module")
def moe():
    torch.manual_seed(0)
    return build_student("moe", modules=K, num_classes=NC, img_size=IMG, embed_dim=D, num_heads=3)  # width 192


def test_stitch_inserts_nothing_where_widths_match(moe):
    for stage in moe.stages:
        s = stitch(stage, D, D, kind="ln_linear")
        assert isinstance(s.pre, nn.Identity) and isinstance(s.post, nn.Identity) and s.stage is stage


@pytest.mark.parametrize("kind", ["linear", "ln_linear"])
def test_stitch_inserts_layers_where_widths_differ(nac, kind):
    first, middle, last = nac.stages[0], nac.stages[1], nac.stages[-1]
    s0, s1, s3 = stitch(first, None, D, kind), stitch(middle, D, D, kind), stitch(last, D, None, kind)
    assert isinstance(s0.pre, nn.Identity)  # image in: no pre-stitch
    assert isinstance(s3.post, nn.Identity)  # logits out: no post-stitch
    for layer, (w_in, w_out) in ((s0.post, (64, D)), (s1.pre, (D, 64)), (s1.post, (64, D)), (s3.pre, (D, 64))):
        if kind == "linear":
            assert isinstance(layer, nn.Linear)
            linear = layer
        else:
            assert isinstance(layer, nn.Sequential) and isinstance(layer[0], nn.LayerNorm)
            assert layer[0].normalized_shape == (w_in,)
            linear = layer[1]
        assert (linear.in_features, linear.out_features) == (w_in, w_out)
    assert (s1.interface.width_in, s1.interface.width_out) == (D, D)
    with torch.no_grad():  # a NAC stage takes the meta model's 5 tokens in distillation mode only
        assert s1.distillation_mode(True)(torch.randn(B, 5, D)).shape == (B, 5, D)
    s1.distillation_mode(False)


def test_stitch_rejects_bad_input(nac):
    with pytest.raises(MonomodError, match="unknown stitch kind"):
        stitch(nac.stages[1], D, D, kind="conv")
    with pytest.raises(MonomodError, match="not a \\[B, T, D\\] token tensor"):
        stitch(nac.stages[1], None, D)
    with pytest.raises(MonomodError, match="no StageInterface"):
        stitch(nn.Linear(3, 3), D, D)


# --- hybrid --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["nac", "moe"])
@pytest.mark.parametrize("i", range(K))
def test_hybrid_trains_only_the_student_stage(request, part, images, family, i):
    student = request.getfixturevalue(family)
    meta = build_meta(part)
    iface = meta.interfaces[i]
    stitched = stitch(student.stages[i], iface.width_in, iface.width_out, kind="ln_linear").distillation_mode(True)
    net = hybrid(meta, i, stitched)
    net.train()
    context = [s for j, s in enumerate(meta.stages) if j != i]
    assert all(not m.training for s in context for m in s.modules())  # the frozen context stays in eval
    assert stitched.training
    student.zero_grad(set_to_none=True)
    out = net(images)
    assert out.shape == (B, NC)
    out.logsumexp(dim=-1).mean().backward()

    assert all(p.grad is None for p in meta.parameters())
    assert not any(p.requires_grad for s in context for p in s.parameters())
    # In distillation mode NAC stages run dense attention with one fixed shared code (METHOD.md: m2mKD distils
    # simplified NAC modules), so the cells' codes, signatures and kernel bandwidth are never trained there; the
    # read-in hands the meta model only its image-carrying latents, so the mediators' initial states wait too.
    cells = {"stage.codes", "stage.signatures", "stage.kernel.bandwidth", "stage.cell_signatures",
             "stage.sender_codes", "stage.mediator_init"}
    unused = {n for n, _ in stitched.named_parameters() if n in cells} if family == "nac" else set()
    got = {name for name, p in stitched.named_parameters() if p.grad is not None}
    assert got == {name for name, _ in stitched.named_parameters()} - unused
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in stitched.parameters()}
    stitched.distillation_mode(False)
    student.zero_grad(set_to_none=True)


def test_hybrid_rejects_width_mismatch(part, nac):
    meta = build_meta(part)
    with pytest.raises(MonomodError, match="wrap the stage with monomod.stitch"):
        hybrid(meta, 1, nac.stages[1])
    with pytest.raises(MonomodError, match="out of range"):
        hybrid(meta, K, nac.stages[1])


def test_teacher_hybrid_equals_teacher(teacher, part, images):
    meta = build_meta(part, kind="teacher")
    net = hybrid(meta, 2, extract(part)[2])
    with torch.no_grad():
        torch.testing.assert_close(net(images), teacher(images), rtol=0, atol=0)
    for p in teacher.parameters():  # hybrid froze the shared teacher parameters; restore for other tests
        p.requires_grad_(True)


# --- CLI -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["nac", "moe", "vit"])
def test_student_cli_table(kind):
    result = CliRunner().invoke(cli, ["student", kind, "--modules", "3"])
    assert result.exit_code == 0, result.output
    for text in ("image->tokens", "tokens->tokens", "tokens->logits", "total", "FLOPs"):
        assert text in result.output


@pytest.mark.parametrize("kind", ["nac", "moe", "vit"])
def test_student_cli_json(kind):
    result = CliRunner().invoke(cli, ["student", kind, "-k", "3", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"kind", "preset", "params", "flops", "stages"}
    assert data["kind"] == kind and isinstance(data["preset"], str)
    assert [s["index"] for s in data["stages"]] == [0, 1, 2]
    assert [s["interface"] for s in data["stages"]] == ["image->tokens", "tokens->tokens", "tokens->logits"]
    assert all(set(s) == {"index", "interface", "width_in", "width_out", "params", "flops"} for s in data["stages"])
    assert all(s["params"] > 0 and s["flops"] > 0 for s in data["stages"])
    assert data["params"] == sum(s["params"] for s in data["stages"])
    assert data["flops"] == sum(s["flops"] for s in data["stages"])
    model = build_student(kind, modules=3, num_classes=10, img_size=32)
    assert data["params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("args", [["student", "resnet"], ["student", "nac", "-k", "2"]])
def test_student_cli_errors_are_one_line(args):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_student_cli_help_shows_examples():
    result = CliRunner().invoke(cli, ["student", "--help"])
    assert result.exit_code == 0 and "monomod student nac --modules 4" in result.output
