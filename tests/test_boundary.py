"""The boundary loss: a stitched student stage's output pulled toward the meta model's own stage output, so the
distilled stages chain when assembled (``--boundary-loss``)."""
import pytest
import torch

from monomod.runtime import losses
from monomod.runtime.execute import execute, prepare_run_dir
from monomod.runtime.losses import boundary_loss
from test_plan import plan_for
from plan_helpers import tiny_plan


def test_boundary_loss_is_zero_at_the_target_and_scale_free():
    meta = torch.randn(4, 5, 8)
    student = meta + 0.3 * torch.randn_like(meta)
    assert boundary_loss(meta.clone(), meta) == 0
    torch.testing.assert_close(boundary_loss(10 * student, 10 * meta), boundary_loss(student, meta))
    expected = ((student - meta) ** 2).mean() / (meta ** 2).mean()
    torch.testing.assert_close(boundary_loss(student, meta), expected)


def test_boundary_loss_compares_class_token_and_token_mean_across_token_counts():
    """A NAC's read-in writes 3 latents where the meta model writes 5 tokens: the first tokens and the means of
    the others are compared, so a student whose first token and other-token mean agree scores 0."""
    meta = torch.randn(2, 5, 8)
    rest = meta[:, 1:].mean(dim=1, keepdim=True)
    student = torch.cat([meta[:, :1], rest + torch.tensor([1.0, -1.0]).view(1, 2, 1).expand(2, 2, 8)], dim=1)
    assert float(boundary_loss(student, meta)) < 1e-12
    student.requires_grad_(True)
    boundary_loss(student + 1, meta).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_boundary_loss_defaults_per_family_and_is_hashed_only_when_on():
    """On by default for the V-MoE and ViT students, off for the NAC; a plan without it keeps its old hashes (and
    so its finished m2mKD jobs), and turning it on re-runs them."""
    loss = lambda plan: plan.job("m2mkd:0").config["loss"]  # noqa: E731
    assert "boundary_loss" not in loss(plan_for(student="nac"))
    assert loss(plan_for(student="moe", modules=3))["boundary_loss"] == 10.0
    off, asked = plan_for(student="moe", modules=3, boundary_loss=0), plan_for(student="moe", modules=3, boundary_loss=2)
    assert "boundary_loss" not in loss(off) and loss(asked)["boundary_loss"] == 2.0
    assert off.job("m2mkd:0").hash != asked.job("m2mkd:0").hash
    assert off.job("meta").hash == asked.job("meta").hash
    assert loss(plan_for(student="nac", boundary_loss=3))["boundary_loss"] == 3.0


@pytest.mark.parametrize("student", ["moe", "nac"])
def test_m2mkd_job_adds_the_boundary_loss_against_the_meta_stage(tmp_path, monkeypatch, student):
    calls = []

    def recording(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        calls.append((s.shape, m.shape, m.requires_grad, s.requires_grad))
        return boundary_loss(s, m)

    monkeypatch.setattr(losses, "boundary_loss", recording)
    plan = tiny_plan(student=student, modules=3, steps=2, boundary_loss=1.0)
    run_dir = prepare_run_dir(plan, tmp_path / "run")
    execute(plan, run_dir, only=["teacher", "meta", "m2mkd:0", "m2mkd:2"])
    assert len(calls) == 2  # m2mkd:0's two steps; the last stage writes logits, so it has no boundary
    student_shape, meta_shape, meta_grad, student_grad = calls[0]
    assert student_shape[-1] == meta_shape[-1] and student_grad and not meta_grad
    assert (student_shape[1] == meta_shape[1]) == (student == "moe")  # the NAC's read-in writes its latents
