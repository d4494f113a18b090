"""A plain ViT student: a small timm ``VisionTransformer`` cut into K contiguous stages.

The stages *reference* the timm model's submodules and parameters (no copies), so chaining the stages is exactly
the timm model's own forward, and the timm model stays usable for cross-checks through ``student.vit``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from timm.layers import global_pool_nlc
from timm.models.vision_transformer import VisionTransformer

from .base import Stage, StagedModel, StageInterface, check_vit_geometry

# timm VisionTransformer keyword arguments. "tiny"/"small" are timm's vit_tiny/vit_small_patch16 shapes;
# "micro" is CPU-sized (patch 4 gives 64 patches on 32 px images).
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0),
    "small": dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "micro": dict(patch_size=4, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0),
}


def split_depth(depth: int, modules: int) -> list[int]:
    """Blocks per stage, as even as possible; the first ``depth % modules`` stages get one extra block.

    Every stage must own at least one block (a stage without blocks would have nothing to distil), and K >= 2
    because stage 0 (image->tokens) and the last stage (tokens->logits) are different kinds.
    """
    if modules < 2:
        raise ValueError(f"need K >= 2 modules (stage 0 embeds the image, the last owns the head); got K={modules}")
    if depth < modules:
        raise ValueError(f"cannot split depth={depth} blocks into K={modules} modules: need depth >= K")
    base, extra = divmod(depth, modules)
    return [base + (1 if i < extra else 0) for i in range(modules)]


def _share(stage: nn.Module, vit: VisionTransformer, names: tuple[str, ...]) -> None:
    """Give ``stage`` the ViT's own attributes of these names (modules and parameters shared, not copied; None
    where the ViT has none), under the same names, so the stage's weights keep timm's keys."""
    for name in names:
        setattr(stage, name, getattr(vit, name))


class ViTEmbedStage(Stage):
    """Stage 0: patch embedding, prefix tokens, position embedding, pre-norm, then its blocks."""

    def __init__(self, vit: VisionTransformer, blocks: list[nn.Module]) -> None:
        super().__init__()
        _share(self, vit, ("patch_embed", "cls_token", "reg_token", "pos_embed", "no_embed_class", "pos_drop",
                           "patch_drop", "norm_pre"))
        self.blocks = nn.Sequential(*blocks)
        self.interface = StageInterface("image->tokens", None, vit.embed_dim)

    def _add_pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Same result as timm's ``_pos_embed`` for a fixed image size (dynamic sizes are rejected at build)."""
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.pos_embed is not None and self.no_embed_class:
            x = x + self.pos_embed  # position embedding covers patches only; add before prepending prefix tokens
        if prefix:
            x = torch.cat(prefix + [x], dim=1)
        if self.pos_embed is not None and not self.no_embed_class:
            x = x + self.pos_embed
        return self.pos_drop(x) if self.pos_embed is not None else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = self._add_pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        return self.blocks(x)


class ViTBlocksStage(Stage):
    """A middle stage: a contiguous group of transformer blocks; works for any token count."""

    def __init__(self, width: int, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.interface = StageInterface("tokens->tokens", width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ViTHeadStage(Stage):
    """Last stage: its blocks, the final norm, timm's pooling and the classifier head."""

    def __init__(self, vit: VisionTransformer, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        _share(self, vit, ("norm", "attn_pool", "fc_norm", "head_drop", "head", "global_pool", "num_prefix_tokens",
                           "pool_include_prefix"))
        self.interface = StageInterface("tokens->logits", vit.embed_dim, None)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        """Mirror of ``VisionTransformer.pool`` (kept here so the stage does not need the timm root module)."""
        if self.attn_pool is not None:
            if not self.pool_include_prefix:
                x = x[:, self.num_prefix_tokens:]
            return self.attn_pool(x)
        return global_pool_nlc(
            x,
            pool_type=self.global_pool,
            num_prefix_tokens=self.num_prefix_tokens,
            reduce_include_prefix=self.pool_include_prefix,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.blocks(x))
        x = self.fc_norm(self._pool(x))
        return self.head(self.head_drop(x))


class ViTStudent(StagedModel):
    """A ``StagedModel`` that also keeps the timm model it was cut from, for checks and timm tooling.

    The timm model is held in a tuple, so it is *not* a registered submodule: ``parameters()``, ``state_dict()``
    and ``apply()`` see every tensor once, under ``stages.*`` only. The stages are the source of truth; the timm
    model shares their modules and parameters, so it follows ``.to()``/optimizer updates, but it would go stale if
    a stage's parameter were replaced by a new object (e.g. ``load_state_dict(..., assign=True)``).
    """

    def __init__(self, vit: VisionTransformer, stages: list[Stage], *, num_classes: int, img_size: int,
                 in_chans: int) -> None:
        super().__init__(stages, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
        self._vit_ref = (vit,)

    @property
    def vit(self) -> VisionTransformer:
        return self._vit_ref[0]


def build_vit(*, modules: int, num_classes: int, img_size: int, in_chans: int = 3, preset: str = "micro",
              **overrides: Any) -> ViTStudent:
    """Build a timm ViT from ``VIT_PRESETS[preset]`` (plus ``overrides``, any VisionTransformer keyword) and cut
    it into ``modules`` contiguous stages. Nothing is downloaded: weights are timm's random init."""
    if preset not in VIT_PRESETS:
        raise ValueError(f"unknown ViT preset {preset!r}; choose from {sorted(VIT_PRESETS)}")
    if overrides.get("dynamic_img_size"):
        raise ValueError("dynamic_img_size is not supported: a student has a fixed image size")
    kwargs = {**VIT_PRESETS[preset], **overrides}
    check_vit_geometry(img_size, kwargs.get("patch_size", 16), kwargs.get("depth"))
    split_depth(int(kwargs["depth"]), modules)  # validate before allocating the model
    vit = VisionTransformer(img_size=img_size, in_chans=in_chans, num_classes=num_classes, **kwargs)
    return cut_vit(vit, modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans)


def cut_vit(vit: VisionTransformer, modules: int, *, num_classes: int, img_size: int, in_chans: int) -> ViTStudent:
    """Cut a timm ViT into ``modules`` contiguous stages (blocks split by ``split_depth``), sharing its modules.

    Used by every ViT-shaped student (plain ViT, V-MoE), whatever their blocks' ``mlp_layer``.
    """
    blocks = list(vit.blocks)
    groups, start = [], 0
    for n in split_depth(len(blocks), modules):
        groups.append(blocks[start:start + n])
        start += n
    stages: list[Stage] = [ViTEmbedStage(vit, groups[0])]
    stages += [ViTBlocksStage(vit.embed_dim, g) for g in groups[1:-1]]
    stages.append(ViTHeadStage(vit, groups[-1]))
    return ViTStudent(vit, stages, num_classes=num_classes, img_size=img_size, in_chans=in_chans)
