"""Students a user brings: ``--to <timm model name>`` or ``--to pkg.module:factory``.

A factory may return a ``StagedModel`` with K stages (the interface ``monomod student`` prints), used as it is, or
any ``nn.Module``; a timm name builds that timm model with the run's image size, classes and channels. A plain
module is cut into K stages by the compiler's own passes, as the teacher is: trace, partition (the most balanced cut),
extract. The stitch layers then join each stage to the teacher's boundaries by their shapes
(``monomod.students.stitching``), so the student may be smaller or larger than its teacher, a CNN or a ViT.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Any, Literal

import torch
from torch import nn

from monomod.errors import MonomodError, first_line, shorten
from monomod.students import STUDENT_KINDS
from monomod.students.base import StagedModel, extracted_stages

SpecKind = Literal["family", "code", "timm"]


def resolve_student(spec: str) -> SpecKind:
    """Which kind of student ``spec`` names: a built-in family, Python code, or a timm model (aliases included)."""
    if spec in STUDENT_KINDS:
        return "family"
    if isinstance(spec, str) and ":" in spec:
        return "code"
    if isinstance(spec, str) and is_timm_model(spec):
        return "timm"
    raise MonomodError(f"unknown student --to {spec!r}",
                       f"use one of {', '.join(STUDENT_KINDS)}, a timm model name or pkg.module:factory")


def check_student_kind(spec: Any) -> None:
    """MonomodError (one line) unless ``spec`` names a student monomod can build."""
    if not isinstance(spec, str) or not spec:
        raise MonomodError(f"unknown student --to {shorten(repr(spec))}",
                           f"use one of {', '.join(STUDENT_KINDS)}, a timm model name or pkg.module:factory")
    resolve_student(spec)


def is_timm_model(name: str) -> bool:
    import timm

    from monomod.frontend import resolve_name

    return timm.is_model(resolve_name(name))


def build_custom(spec: str, *, modules: int, num_classes: int, img_size: int, in_chans: int = 3,
                 **overrides: Any) -> StagedModel:
    """The student ``spec`` names, as a K-stage StagedModel; ``overrides`` go to the factory or timm."""
    if resolve_student(spec) == "timm":
        from monomod.frontend import load_model

        model = load_model(spec, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **overrides).train()
    else:
        model = _call_factory(spec, dict(modules=modules, num_classes=num_classes, img_size=img_size,
                                         in_chans=in_chans), overrides)
    if isinstance(model, StagedModel):
        if len(model.stages) != modules:
            raise MonomodError(f"{spec!r} built a StagedModel of {len(model.stages)} stages, not {modules}",
                               f"pass --modules {len(model.stages)}, or make the factory take `modules`")
        return model
    return cut_into_stages(model, modules, num_classes=num_classes, img_size=img_size, in_chans=in_chans, name=spec)


def _call_factory(spec: str, run: dict[str, int], overrides: dict[str, Any]) -> nn.Module:
    """Import and call ``pkg.module:factory`` with the run arguments its signature takes, and ``overrides``."""
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise MonomodError(f"cannot import {spec!r} ({first_line(e)})",
                           "use 'package.module:factory' naming an importable callable") from None
    try:
        params = inspect.signature(factory).parameters
        open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs = {k: v for k, v in run.items() if open_kwargs or k in params}
    except (TypeError, ValueError):  # no signature (a builtin): give it the overrides only
        kwargs = {}
    try:
        model = factory(**kwargs, **overrides)
    except TypeError as e:
        raise MonomodError(f"cannot call {spec!r} with {shorten(str({**kwargs, **overrides}))}: {first_line(e)}",
                           "drop the student_overrides that factory does not take") from None
    if not isinstance(model, nn.Module):
        raise MonomodError(f"{spec!r} returned {type(model).__name__}, not an nn.Module",
                           "point it at a factory that builds the student")
    return model


def cut_into_stages(model: nn.Module, modules: int, *, num_classes: int, img_size: int, in_chans: int,
                    name: str) -> StagedModel:
    """``model`` traced on a batch-1 example (on the device its parameters are on, the meta device included),
    partitioned into ``modules`` balanced parts and extracted; every boundary must be a single tensor."""
    from monomod.frontend import example_input
    from monomod.passes.partition import partition
    from monomod.passes.trace import trace

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    example = example_input(in_chans, img_size, device=device)
    training = model.training
    cut = partition(trace(model.eval(), example, name=name), modules)
    for spec in cut.modules[:-1]:
        if len(spec.outputs) != 1 or spec.outputs[0].shape is None:
            raise MonomodError(f"the student {name} cut into {modules} passes "
                               f"{', '.join(v.describe() for v in spec.outputs)} after module {spec.index}",
                               "choose another --modules, or give a factory that returns a StagedModel")
    staged = StagedModel(extracted_stages(cut), num_classes=num_classes, img_size=img_size, in_chans=in_chans).train(training)
    staged.source = name  # plain attribute, for reports
    return staged


__all__ = ["build_custom", "check_student_kind", "cut_into_stages", "resolve_student"]
