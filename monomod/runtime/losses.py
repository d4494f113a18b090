"""The m2mKD loss (METHOD.md, step 4)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from monomod.errors import MonomodError


def m2mkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float = 0.5,
    tau: float = 1.0,
    kd: str = "soft",
    kl_norm: str = "batchmean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``(1 - alpha) * CE(z_S, y) + alpha * tau^2 * KL(softmax(z_T / tau) || softmax(z_S / tau))``.

    ``kd="hard"`` replaces the KL term by cross-entropy against the teacher's argmax (no tau). ``kl_norm`` is how the
    summed KL is averaged: ``"batchmean"`` divides by the batch size (the KL per sample, as the formula reads);
    ``"reference"`` divides by batch x classes, as the m2mKD and DeiT reference code does, which weakens the KL
    term by a factor of the number of classes. ``targets`` are class indices, or class probabilities (mixup and
    CutMix keep on during m2mKD as in the reference); ``label_smoothing`` applies to the task term only.
    """
    ce = soft_cross_entropy(student_logits, targets, label_smoothing)
    teacher_logits = teacher_logits.detach()
    if kd == "hard":
        distill = F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    elif kd == "soft":
        kl = F.kl_div(
            F.log_softmax(student_logits / tau, dim=-1),
            F.log_softmax(teacher_logits / tau, dim=-1),
            reduction="sum",
            log_target=True,
        )
        norm = student_logits.shape[0] if kl_norm == "batchmean" else student_logits.numel()
        distill = tau**2 * kl / norm
    else:
        raise ValueError(f"kd must be 'soft' or 'hard', got {kd!r}")
    return (1 - alpha) * ce + alpha * distill


def soft_cross_entropy(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy against class indices (integer ``(B,)``) or class probabilities (float ``(B, C)``, e.g.
    mixup targets). Label smoothing mixes the targets with the uniform distribution. Computed in fp32."""
    logits = logits.float()
    if not targets.is_floating_point():
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    targets = targets.float()
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def boundary_loss(student: Tensor, meta: Tensor) -> Tensor:
    """How far a stitched student stage's output is from the meta model's own stage output, relative to the meta
    output's mean square: the stage i+1 student was distilled on the meta output, so a stage i student that writes
    it chains into stage i+1 when the student is assembled. Where the token counts differ (a NAC's read-in writes
    its latents, not one token per patch), the first token (the class token) and the mean of the others are
    compared. The mean square is the batch's: under data parallelism each rank takes its own shard's, so a DDP run
    differs from one process by that ratio (as BatchNorm does without syncing)."""
    if student.shape != meta.shape:
        student = torch.stack([student[:, 0], student[:, 1:].mean(dim=1)], dim=1)
        meta = torch.stack([meta[:, 0], meta[:, 1:].mean(dim=1)], dim=1)
    meta = meta.float()
    return F.mse_loss(student.float(), meta) / meta.pow(2).mean().clamp_min(1e-12)


def m2mkd_stage_loss(loss_cfg: dict, y: Tensor, student: tuple[Tensor, Tensor], teacher: tuple[Tensor, Tensor],
                     meta_features: Tensor | None, label_smoothing: float, last: bool) -> Tensor:
    """The loss of one m2mKD student stage (a separate job or a member of the fused one): the m2mKD loss on the
    hybrids' logits, plus the feature loss against the teacher module's output and the boundary loss against the
    meta model's own stage output where the plan asks for them. ``student`` and ``teacher`` are (stage output,
    logits); ``last``: the last stage writes logits, so it has no boundary."""
    (student_features, student_logits), (teacher_features, teacher_logits) = student, teacher
    loss = m2mkd_loss(student_logits, teacher_logits, y, alpha=loss_cfg["alpha"], tau=loss_cfg["tau"],
                      kd=loss_cfg["kd"], kl_norm=loss_cfg["kl_norm"], label_smoothing=label_smoothing)
    feature_weight = 0.0 if last else loss_cfg.get("feature_loss", 0.0)
    if feature_weight:
        if student_features.shape != teacher_features.shape:
            raise MonomodError(f"the feature loss compares {tuple(student_features.shape)} student features with "
                               f"{tuple(teacher_features.shape)} teacher features", "set feature_loss to 0 for this student")
        loss = loss + feature_weight * F.mse_loss(student_features, teacher_features)
    boundary_weight = 0.0 if last else loss_cfg.get("boundary_loss", 0.0)
    if boundary_weight:
        loss = loss + boundary_weight * boundary_loss(student_features, meta_features)
    return loss
