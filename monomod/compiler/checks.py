"""Compile-time checks: everything a conversion can be refused for is refused before any job runs, in a dry run too.

Each check is cheap: the teacher and the student are built on the meta device (no memory for weights), a weights
file is judged by its safetensors header, image folders by a directory listing. A huge ``--modules`` is bounded by
the teacher's places to cut before a student or plan of that size is built (it hung before).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monomod.data import IMAGE_SUFFIXES
from monomod.errors import MonomodError, first_line, shorten
from monomod.ir import TracedModel



def check_checkpointing(every: Any, minutes: Any) -> None:
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise MonomodError(f"checkpoint_every must be an integer >= 0, got {shorten(repr(every))}",
                           "pass 0 (by time only) or a number of steps")
    if minutes is not None and (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
                                or not math.isfinite(minutes) or minutes < 0):
        raise MonomodError(f"checkpoint_minutes must be a finite number >= 0, got {shorten(repr(minutes))}",
                           "pass 0 (by steps only) or e.g. 10")


def check_teacher_takes(teacher: nn.Module, name: str, modules: int, img_size: int, in_chans: int) -> TracedModel:
    """Trace the (meta) teacher on the run's input: an image size or channel count it cannot take, or more modules
    than it has places to cut, fail here in one line. Returns the trace, for the partition pass."""
    from monomod.frontend import example_input
    from monomod.passes.partition import max_modules
    from monomod.passes.trace import trace

    example = example_input(in_chans, img_size, device="meta")
    traced = trace(teacher, example, name=name)
    limit = max_modules(traced)
    if modules > limit:
        raise MonomodError(f"--modules {shorten(str(modules))} is more than {name} can be cut into ({limit} at most)",
                           f"pass --modules {limit} or fewer")
    return traced


def check_meta_builds(partition: Any, width: int | None, cuts: tuple[str, ...]) -> None:
    """The trained meta model builds on the teacher's boundaries (on the meta device): a cut that passes two
    tensors, or a shape it cannot follow, fails here in one line rather than in the meta job."""
    from monomod.students.meta import build_meta

    try:
        with torch.device("meta"):
            build_meta(partition, width, kind="trained")
    except MonomodError as e:
        raise MonomodError(f"the teacher cut at {', '.join(cuts)}: {e.problem}",
                           "pass --cuts at single-tensor boundaries (monomod inspect shows them), another "
                           "--modules or --tolerance, or --meta teacher") from None


def check_student_builds(options: Any, num_classes: int, teacher_cut: Any = None) -> nn.Module | None:
    """Build the student on the meta device: unknown or invalid student overrides, a preset or image size it
    cannot take fail here, not in the first m2mKD job; given the teacher's partition (as the jobs replay it), so
    does a boundary that no stitch layer joins to the teacher's. Returns the meta student (None when its family
    cannot be built on the meta device), for the memory estimate."""
    from monomod.students import build_on_meta

    try:
        student = build_on_meta(options.student, modules=options.modules, num_classes=num_classes,
                                img_size=options.img_size, in_chans=options.in_chans,
                                preset=options.student_preset, **options.student_overrides)
    except MonomodError as e:
        raise MonomodError(f"the {options.student} student: {e.problem}",
                           e.fix or "fix the --img-size, --in-chans or student_overrides") from None
    except (TypeError, ValueError, AssertionError) as e:
        raise MonomodError(f"the {options.student} student cannot be built with overrides "
                           f"{shorten(str(options.student_overrides))} ({first_line(e)})",
                           "fix or drop the student_overrides") from None
    except RuntimeError as e:
        if "meta" in str(e):
            return None  # a family that computes at init (NAC) cannot be built on meta: its config already passed
        raise MonomodError(f"the {options.student} student cannot be built ({first_line(e)})",
                           "fix the student_overrides, --img-size or --in-chans") from None
    if teacher_cut is not None:
        _check_stitches(student, teacher_cut)
    return student


def _check_stitches(student: nn.Module, teacher_cut: Any) -> None:
    """Every boundary of the (meta) student joins the teacher's through a stitch layer, or one line says which."""
    from monomod.students.stitching import boundary_shapes, check_student_stitches

    try:
        boundary_shapes(student)
    except (RuntimeError, NotImplementedError, TypeError):
        return  # a stage that cannot run on the meta device: the first m2mKD job measures it for real
    check_student_stitches(student, teacher_cut)


def weight_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file; a safetensors file is judged by its header alone."""
    from monomod.frontend import load_state_dict

    if not path.is_file():
        raise MonomodError(f"weights file {shorten(str(path))!r} does not exist", "check the path passed to --weights")
    if path.suffix != ".safetensors":
        return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {k.removeprefix("module."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - a torn or foreign file
        raise MonomodError(f"weights file {shorten(str(path))!r} is not a readable safetensors file ({first_line(e)})",
                           "export it again with safetensors.torch.save_file") from None
    return shapes


def check_weights(teacher: nn.Module, path: str | Path) -> None:
    """The weights file fits the teacher (the classifier and position embeddings may differ: they are adapted)."""
    shapes = weight_shapes(Path(path))
    own = {k: tuple(v.shape) for k, v in teacher.state_dict().items()}
    head = (getattr(teacher, "pretrained_cfg", None) or {}).get("classifier")
    adapted = lambda k: k.endswith("pos_embed") or (isinstance(head, str) and k.startswith(head + "."))  # noqa: E731
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    mismatched = [k for k in own if k in shapes and shapes[k] != own[k] and not adapted(k)]
    if missing or unexpected or mismatched:
        detail = "; ".join(f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                           for what, keys in (("missing", missing), ("unexpected", unexpected),
                                              ("shape mismatch", mismatched)) if keys)
        raise MonomodError(f"weights file {shorten(str(path))!r} does not fit the teacher ({shorten(detail, 200)})",
                           "pass the weights of this teacher model")


def check_image_folders(spec: Any) -> None:
    """An ``imagefolder:`` training split with one class, or where a class folder holds no image, is refused,
    naming the folder."""
    from monomod.data import parse_data_spec

    parsed = parse_data_spec(spec)
    if parsed.kind != "imagefolder":
        return
    train = Path(parsed.path) / "train"
    if not train.is_dir():
        return  # load_data says what is missing
    folders = sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in folders:
        if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir() if f.is_file()):
            raise MonomodError(f"class folder {shorten(str(folder))} holds no images",
                               f"add images ({', '.join(IMAGE_SUFFIXES[:3])}, ...) or remove the folder")
    if len(folders) == 1:
        raise MonomodError(f"{shorten(str(train))} has one class folder ({shorten(folders[0].name, 40)}); a classifier "
                           "needs two or more", f"add a folder per class to {shorten(str(train))}")


# ---------------------------------------------------------------------------------------------------- memory

GIB = 1 << 30


def memory_limit() -> int:
    """Bytes a job can use: the accelerator's memory where training runs on one, else this machine's RAM."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return 1 << 62


def training_bytes(params: int, activation_bytes_per_sample: int, batch_size: int) -> dict[str, int]:
    """The terms of a training job's memory: fp32 weights, gradients and two AdamW moments (16 bytes a parameter),
    and every traced activation kept for the backward pass at the batch size. A rough upper bound, meant to refuse
    what cannot possibly fit (a million input channels, a 100000-pixel image), not to plan a tight run."""
    return {"parameters": 16 * params, "activations": activation_bytes_per_sample * batch_size}


def check_memory(terms: dict[str, int], fixes: dict[str, str], *, limit: int | None = None,
                 where: str = "the limit", what: str = "the run") -> None:
    """Refuse, before any work, a run whose estimated memory exceeds the machine's (or ``limit``, named
    ``where``), naming the largest term and the option that sets it (``fixes``: term -> advice)."""
    if limit is None:
        limit, where = memory_limit(), "this machine"
    total = sum(terms.values())
    if total <= limit:
        return
    largest = max(terms, key=terms.get)
    detail = ", ".join(f"{name} {_gib(terms[name])}" for name in terms if terms[name])
    raise MonomodError(f"{what} needs about {_gib(total)} GiB of memory ({detail}), more than {_gib(limit)} GiB "
                       f"({where})",
                       fixes.get(largest, "use a smaller model or input"))


def _gib(n: int) -> str:
    """Bytes as GiB, readable at any size: 0.08, 12.5, 7,150,000,000."""
    gib = n / GIB
    return f"{gib:.3g}" if gib < 1000 else f"{gib:,.0f}"


def check_student_memory(student: nn.Module) -> None:
    """A (meta) student whose fp32 weights alone exceed this machine's memory is refused before it is built."""
    params = sum(p.numel() for p in student.parameters())
    check_memory({"student parameters": 4 * params},
                 {"student parameters": "lower --img-size, --in-chans, --num-classes or the --preset"},
                 what="the student")


def traced_bytes(traced: TracedModel) -> tuple[int, int]:
    """(parameters, activation bytes per sample) of a traced model, as the memory estimate counts them."""
    return sum(n.params for n in traced.nodes.values()), sum(n.bytes for n in traced.nodes.values())
