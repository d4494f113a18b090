"""Recipes: named ``monomod convert`` setups in YAML, shipped as package data next to this file.

This package *is* ``monomod.recipes`` (pyproject maps it onto ``recipes/``, so the YAML files and their loader live
together; a ``monomod/recipes.py`` module would be shadowed by this package). One schema for every recipe::

    description: one line shown by `monomod recipes list`          (required)
    teacher: vit_huge            # the convert options, same names and meaning (monomod.compiler.options.OPTIONS)
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

``SCHEMA`` is the option spec itself (``monomod.compiler.options.SPEC``): the flags of ``monomod convert``, the recipe
keys and their checks come from one table. Every key and value is checked when the recipe is loaded; a bad one raises a one-line ``MonomodError`` naming the
file, the key and what is allowed. ``--set key=value`` overrides (values parsed as YAML, dotted keys reach into
mappings: ``--set budgets.m2mkd.epochs=1``) go through the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monomod.compiler.options import REQUIRED as OPTION_REQUIRED
from monomod.compiler.options import SPEC, convert_options, validate
from monomod.errors import MonomodError, shorten
from monomod.safe import load_yaml, read_yaml

RECIPE_DIR = Path(__file__).resolve().parent


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

REQUIRED = ("description", *OPTION_REQUIRED)


def check(values: Any, source: str, *, partial: bool = False) -> dict[str, Any]:
    """Check recipe ``values`` (from ``source``, a file name or ``--set``) against the option spec; returns them
    unchanged. ``partial`` checks each value alone (for ``--set`` overrides, checked again once merged)."""
    if not isinstance(values, dict):
        raise MonomodError(f"{source}: a recipe is a YAML mapping of keys to values", "see `monomod recipes show`")
    if not partial:
        missing = [k for k in REQUIRED if k not in values]
        if missing:
            raise MonomodError(f"{source}: missing key(s) {', '.join(missing)}", f"every recipe sets {', '.join(REQUIRED)}")
    validate(values, source, partial=partial)
    return values


def to_convert_options(values: dict[str, Any]):
    """The ConvertOptions of recipe values (checked): the keys that are options, ``ood: none`` as no OOD split."""
    return convert_options(values)


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
    values = read_yaml(path, path.name)
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
        value = _set_value(raw, key)
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


def _set_value(raw: str, key: str) -> Any:
    """A ``--set`` value parsed as YAML by the one loader (its limits and plain types); text that is not YAML
    stays text, but a value the loader refuses (a 5000-digit number, a date) is refused here in one line."""
    if not raw.strip():
        return None
    try:
        return load_yaml(raw, f"--set {shorten(key, 60)}", "give a plain value (quote text that looks like a date)")
    except MonomodError as e:
        if "is not valid YAML" in e.problem:
            return raw
        raise


SCHEMA = SPEC  # recipe key -> its Option (what it allows, in words: ``SCHEMA[key].allowed``)

__all__ = ["REQUIRED", "RECIPE_DIR", "Recipe", "SCHEMA", "check", "list_recipes", "load_recipe", "parse_sets",
           "recipe_names", "to_convert_options"]
