"""Recipes: named ``monomod convert`` setups in YAML, shipped as package data next to this file.

This package *is* ``monomod.recipes`` (pyproject maps it onto ``recipes/``, so the YAML files and their loader live
together; a ``monomod/recipes.py`` module would be shadowed by this package). One schema for every recipe::

    description: one line shown by `monomod recipes list`          (required)
    teacher: vit_huge            # the ConvertOptions fields, same names and meaning (monomod.passes.plan)
    student: nac                 # teacher, student and modules are required
    modules: 10
    data: imagefolder:data/tiny-imagenet-200
    ood: imagefolder:data/tiny-imagenet-r
    preset: paper
    student_preset: tinyimagenet
    meta_width: 1280
    budgets:                     # optional, per job kind (teacher, meta, incubate, m2mkd, finetune), over the preset's
      finetune: {epochs: 400}
    data_info: {num_classes: 200, train_size: 100000}   # optional: lets --dry-run plan without the data folder

Every key and value is checked when the recipe is loaded; a bad one raises a one-line ``MonomodError`` naming the
file, the key and what is allowed. ``--set key=value`` overrides (values parsed as YAML, dotted keys reach into
mappings: ``--set budgets.m2mkd.epochs=1``) go through the same checks.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from monomod.errors import MonomodError, shorten

RECIPE_DIR = Path(__file__).resolve().parent


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-4`` (no dot) as a string; a recipe means the number."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$|^[-+]?\.(?:inf|Inf|INF)$|^\.(?:nan|NaN|NAN)$"),
    list("-+0123456789."),
)

_PRESETS_OF = {"nac": ("monomod.students.nac", "NAC_PRESETS"), "moe": ("monomod.students.moe", "MOE_PRESETS"),
               "vit": ("monomod.students.vit", "VIT_PRESETS")}


@dataclass(frozen=True)
class Recipe:
    name: str
    path: Path
    description: str
    values: dict[str, Any]  # ConvertOptions fields (checked), plus data_info when given

    def convert_options(self, overrides: dict[str, Any] | None = None):
        """The ConvertOptions this recipe describes, with ``overrides`` (already checked) applied on top."""
        return to_convert_options({**self.values, **(overrides or {})})

    @property
    def data_info(self) -> dict[str, int] | None:
        return self.values.get("data_info")


# --------------------------------------------------------------------------------------------------- the schema


def _is_int(v: Any, minimum: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _data_spec(v: Any) -> bool:
    return isinstance(v, str) and (v in ("digits", "synthetic") or (v.startswith("imagefolder:") and len(v) > 12))


def _ood_spec(v: Any) -> bool:
    return v is None or v in ("auto", "none") or (isinstance(v, str) and v.startswith("imagefolder:") and len(v) > 12)


def _choice(*allowed: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v in allowed), "one of " + ", ".join("null" if a is None else str(a) for a in allowed)


# key -> (check, what is allowed). Keys are ConvertOptions fields, plus description, budgets and data_info.
SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "description": (lambda v: isinstance(v, str) and v.strip() != "" and "\n" not in v.strip(), "a one-line string"),
    "teacher": (lambda v: isinstance(v, str) and v != "", "a model name (timm name, alias or pkg.mod:factory)"),
    "student": _choice("nac", "moe", "vit"),
    "modules": (lambda v: _is_int(v, 2), "an integer >= 2"),
    "data": (_data_spec, "digits, synthetic or imagefolder:PATH"),
    "ood": (_ood_spec, "auto, none, null or imagefolder:PATH"),
    "preset": _choice("demo", "paper"),
    "meta": _choice("trained", "teacher"),
    "meta_width": (lambda v: v is None or _is_int(v), "a positive integer or null"),
    "img_size": (lambda v: v is None or _is_int(v), "a positive integer or null"),
    "in_chans": (lambda v: v is None or _is_int(v), "a positive integer or null"),
    "weights": (lambda v: v is None or (isinstance(v, str) and v != ""), "a path to .safetensors/.pth, or null"),
    "pretrained": (lambda v: isinstance(v, bool), "true or false"),
    "teacher_trained": (lambda v: isinstance(v, bool), "true or false"),
    "teacher_training": _choice(None, "incubate", "end-to-end", "none"),
    "distill_targets": _choice("incubated", "finetuned"),
    "distill_data": (lambda v: v is None or _data_spec(v), "null, digits, synthetic or imagefolder:PATH"),
    "student_preset": (lambda v: v is None or isinstance(v, str), "a preset of the student family, or null"),
    "student_overrides": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                          "a mapping of student config fields"),
    "stitch": _choice(None, "linear", "ln_linear"),
    "keep_stitches": (lambda v: isinstance(v, bool), "true or false"),
    "upcycle": (lambda v: isinstance(v, bool), "true or false"),
    "alpha": (lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "tau": (lambda v: _is_num(v) and v > 0, "a number > 0"),
    "kd": _choice("soft", "hard"),
    "kl_norm": _choice(None, "batchmean", "reference"),
    "feature_loss": (lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    "seed": (lambda v: _is_int(v, 0) and v < 2**63 - 1000, "an integer >= 0 (below 2**63)"),
    "checkpoint_every": (lambda v: _is_int(v, 0), "an integer >= 0 (steps; 0 = by time only)"),
    "checkpoint_minutes": (lambda v: _is_num(v) and 0 <= v < float("inf"), "a number >= 0 (minutes; 0 = by steps only)"),
    "budgets": (lambda v: isinstance(v, dict), "a mapping: job kind -> {steps|epochs, lr, batch_size, ...}"),
    "loader_workers": (lambda v: v is None or _is_int(v, 0), "an integer >= 0 (data-loader workers per job) or null"),
    "data_info": (lambda v: isinstance(v, dict) and set(v) <= {"num_classes", "train_size"}
                  and all(_is_int(x) for x in v.values()), "a mapping with num_classes and train_size (integers)"),
}
REQUIRED = ("description", "teacher", "student", "modules")


def check(values: Any, source: str, *, partial: bool = False) -> dict[str, Any]:
    """Check recipe ``values`` (from ``source``, a file name or ``--set``); returns them unchanged.

    ``partial`` skips the required-key check (for ``--set`` overrides, checked again once merged).
    """
    from monomod.passes.plan import BUDGET_KEYS, BUDGET_KINDS

    if not isinstance(values, dict):
        raise MonomodError(f"{source}: a recipe is a YAML mapping of keys to values", "see `monomod recipes show`")
    for key, value in values.items():
        if key not in SCHEMA:
            raise MonomodError(f"{source}: unknown key {key!r}", f"allowed keys: {', '.join(SCHEMA)}")
        ok, allowed = SCHEMA[key]
        if not ok(value):
            raise MonomodError(f"{source}: {key}: {shorten(repr(value))} is not allowed", f"use {allowed}")
    for kind, override in (values.get("budgets") or {}).items():
        if kind not in BUDGET_KINDS:
            raise MonomodError(f"{source}: budgets.{kind}: unknown job kind", f"use {', '.join(BUDGET_KINDS)}")
        if not isinstance(override, dict):
            raise MonomodError(f"{source}: budgets.{kind}: {override!r} is not a mapping",
                               f"give a mapping of {', '.join(BUDGET_KEYS)}")
        for key in override:
            if key not in BUDGET_KEYS:
                raise MonomodError(f"{source}: budgets.{kind}.{key}: unknown key", f"use {', '.join(BUDGET_KEYS)}")
    if not partial:
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise MonomodError(f"{source}: missing key(s) {', '.join(missing)}", f"every recipe sets {', '.join(REQUIRED)}")
        _check_student_preset(values, source)
        try:  # the plan pass's own checks (budget values, modules per family, ...), under this file's name
            from monomod.passes.plan import validate_options

            validate_options(to_convert_options(values))
        except MonomodError as e:
            raise MonomodError(f"{source}: {e.problem}", e.fix) from None
    return values


def _check_student_preset(values: dict[str, Any], source: str) -> None:
    import importlib

    preset = values.get("student_preset")
    if preset is None:
        return
    module, attr = _PRESETS_OF[values["student"]]
    presets = getattr(importlib.import_module(module), attr)
    if preset not in presets:
        raise MonomodError(f"{source}: student_preset: {preset!r} is not a {values['student']} preset",
                           f"use one of {', '.join(sorted(presets))}")


def to_convert_options(values: dict[str, Any]):
    from monomod.passes.plan import ConvertOptions

    fields = {f.name for f in dataclasses.fields(ConvertOptions)}
    kwargs = {k: v for k, v in values.items() if k in fields}
    if kwargs.get("ood") == "none":
        kwargs["ood"] = None
    kwargs["budgets"] = {k: dict(v) for k, v in (kwargs.get("budgets") or {}).items()}
    kwargs["student_overrides"] = dict(kwargs.get("student_overrides") or {})
    return ConvertOptions(**kwargs)


# --------------------------------------------------------------------------------------------------- loading


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A shipped recipe by name (``paper-nac-tinyimagenet``) or a YAML file by path, checked."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and not path.is_file() and not (RECIPE_DIR / path.name).is_file():
        raise MonomodError(f"recipe file {shorten(str(path))!r} does not exist",
                           "check the path, or name a shipped recipe (monomod recipes list)")
    if not (path.suffix in (".yaml", ".yml") and path.is_file()):
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise MonomodError(f"no recipe {shorten(str(name_or_path))!r}",
                               f"use one of {', '.join(recipe_names())} (monomod recipes list) or a .yaml path")
    try:
        values = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as e:
        raise MonomodError(f"{path.name}: not valid YAML ({str(e).splitlines()[0]})", "fix the file") from None
    check(values, path.name)
    return Recipe(name=path.stem, path=path, description=values["description"].strip(), values=values)


def list_recipes() -> list[Recipe]:
    return [load_recipe(name) for name in recipe_names()]


def parse_sets(assignments: list[str] | tuple[str, ...], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``["alpha=0.7", "budgets.m2mkd.epochs=1"]`` -> ``base`` with those values set (parsed as YAML), checked."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or {}).items()}
    for text in assignments:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MonomodError(f"--set {text!r} is not key=value", "write e.g. --set alpha=0.7")
        try:
            value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        *parents, leaf = key.split(".")
        target = values
        for part in parents:
            child = target.get(part)
            if not isinstance(child, dict):
                child = {}
            target[part] = child = {k: (dict(v) if isinstance(v, dict) else v) for k, v in child.items()}
            target = child
        target[leaf] = value
    return values


__all__ = ["REQUIRED", "RECIPE_DIR", "Recipe", "SCHEMA", "check", "list_recipes", "load_recipe", "parse_sets",
           "recipe_names", "to_convert_options"]
