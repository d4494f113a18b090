"""The ``--data`` grammar: ``digits``, ``synthetic`` or ``imagefolder:PATH``, each with an optional ``shots=N``,
parsed once into a ``DataSpec`` that travels."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


from monomod.errors import MonomodError

DATA_KINDS = ("digits", "synthetic", "imagefolder")

_SPEC_FORMS = "'digits', 'synthetic' or 'imagefolder:PATH' (few labels: 'digits:shots=5', 'imagefolder:PATH,shots=5')"


@dataclass(frozen=True)
class DataSpec:
    """A parsed ``--data`` value: the kind, the folder of ``imagefolder``, ``shots`` (labelled images per class) and
    the text it was parsed from. Parsed once (``parse_data_spec``), it travels as this value."""

    kind: str
    path: str | None = None
    shots: int | None = None
    text: str = ""

    def __str__(self) -> str:
        return self.text


def parse_data_spec(spec: Any) -> DataSpec:
    """A ``DataSpec`` (returned as is) or its text: ``digits`` | ``synthetic`` | ``imagefolder:PATH``, each optionally keeping N training images per class:
    ``digits:shots=5``, ``synthetic:shots=5``, ``imagefolder:PATH,shots=5``. Raises a one-line MonomodError."""
    if isinstance(spec, DataSpec):
        return spec
    if not isinstance(spec, str) or not spec:
        raise MonomodError(f"unknown data spec {spec!r}", f"use {_SPEC_FORMS}")
    body, shots = spec, None
    option = re.fullmatch(r"(.*?)[,:]shots=([^,:]*)", spec)
    if option:
        body, value = option.groups()
        if not value.isdigit() or int(value) < 1:
            raise MonomodError(f"shots must be a positive whole number, got {value!r} in {spec!r}",
                               "use e.g. digits:shots=5")
        shots = int(value)
        if body.startswith("imagefolder:") and spec[len(body)] != ",":
            raise MonomodError(f"unknown data spec {spec!r}", "write imagefolder:PATH,shots=N")
    kind, sep, path = body.partition(":")
    if kind in ("digits", "synthetic") and not sep:
        return DataSpec(kind, None, shots, spec)
    if kind == "imagefolder" and path:
        return DataSpec(kind, path, shots, spec)
    if kind == "imagefolder":
        raise MonomodError("imagefolder data needs a path", "use 'imagefolder:PATH' with PATH/train and PATH/val")
    raise MonomodError(f"unknown data spec {spec!r}", f"use {_SPEC_FORMS}")
