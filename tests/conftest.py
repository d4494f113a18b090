"""Shared fixtures: small timm models (no downloads) and their traces, built once per session."""
from __future__ import annotations

import pytest
import timm
import torch

import monomod

# (timm name, constructor kwargs, image size): one of each family the compiler must handle.
FAMILIES = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "num_classes": 10}, 32),
    "deit": ("deit_tiny_distilled_patch16_224", {"img_size": 32, "num_classes": 10}, 32),
    "resnet": ("resnet18", {"num_classes": 10}, 64),
    "convnext": ("convnext_atto", {"num_classes": 10}, 64),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 64, "window_size": 4, "num_classes": 10}, 64),
}


def make_model(family: str) -> tuple[torch.nn.Module, int]:
    name, kwargs, size = FAMILIES[family]
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval(), size


@pytest.fixture(scope="session")
def traced_models() -> dict[str, monomod.TracedModel]:
    out = {}
    for family in FAMILIES:
        model, size = make_model(family)
        out[family] = monomod.trace(model, torch.randn(1, 3, size, size), name=FAMILIES[family][0])
    return out
