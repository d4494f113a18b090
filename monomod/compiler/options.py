"""The one spec of ``monomod convert``'s options: CLI flags, recipe keys, ``--set`` keys and their validation.

Each ``Option`` says its name (the ``ConvertOptions`` field and recipe key), its default, what it allows (a
predicate and the same in words), its help and its flag. ``click_options`` makes the flags of ``monomod convert``
from it, ``monomod.recipes`` checks recipe files with ``validate``, and ``compile_options`` validates the options it
is given with the same ``validate``: an option is checked in one place, whichever way it came in.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from monomod.errors import MonomodError, shorten
from monomod.passes.partition import BALANCE_TOLERANCE, COSTS
from monomod.passes.schedule import (
    BUDGET_KEYS, DISTILL_TARGETS, META_KINDS, PRESETS, TEACHER_TRAININGS, resolve_teacher_training,
)
from monomod.plan import BUDGET_KINDS
from monomod.data import parse_data_spec
from monomod.runtime.config import PRECISIONS
from monomod.runtime.executors import EXECUTORS
from monomod.students import FAMILIES, STITCHES, STUDENT_KINDS, student_family
from monomod.students.custom import resolve_student
from monomod.students.stitching import ASSEMBLY_MODES

MAX_IN_CHANS = 1024  # hyperspectral images have a few hundred bands; a million took minutes to refuse by memory
MAX_SEED = 2**63 - 1 - 1000  # job seeds add small offsets; torch takes at most 2**64-1, numpy uses seed % 2**32
TOLERANCE = BALANCE_TOLERANCE  # the partition's allowed imbalance (max/mean cost <= 1 + tolerance), every command
__all__ = ["COSTS", "EXECUTORS", "OPTIONS", "SPEC", "TOLERANCE", "ConvertOptions", "Option", "check_values",
           "click_options", "convert_options", "options_dict", "validate"]


@dataclass(frozen=True)
class Option:
    """One convert option. ``flag=None``: a recipe / ``--set`` key only (or a flag shared with ``monomod run``)."""

    name: str
    default: Any
    allows: Callable[[Any], bool]
    allowed: str  # what ``allows`` accepts, in words ("a number in [0, 1]")
    help: str = ""
    flag: str | None = None
    short: str | None = None
    choices: tuple[Any, ...] | None = None  # a click.Choice (None, the "not given" value, stays out of it)
    cli_choice: bool = True  # False: the flag takes any text and ``allows`` decides (--to: more kinds may come)
    parse: Callable[[str], Any] | None = None  # the flag's text -> value (default: click's type for ``kind``)
    kind: type = str  # what the flag parses to: str, int, float or bool (an on/off flag)
    must: str | Callable[[Any], str] | None = None  # "--flag must be <must>, got <value>" (default: "unknown
    # --flag 'value'" for choices); a function of the value where the bound it breaks decides the words
    fix: str | None = None
    label: str | None = None  # how an error names it (default: the flag, else the name)
    field: bool = True  # a ConvertOptions field (description and data_info are recipe keys only)

    def problem(self, value: Any) -> MonomodError:
        """The one line for a value the option does not allow, given as a flag or through the Python API."""
        label = self.label or self.flag or self.name
        if self.must is None and self.choices is not None:
            return MonomodError(f"unknown {label} {shorten(repr(value))}",
                                self.fix or f"use one of {', '.join(str(c) for c in self.choices if c is not None)}")
        must = self.must(value) if callable(self.must) else self.must
        return MonomodError(f"{label} must be {must or self.allowed}, got {shorten(repr(value))}",
                            self.fix or f"use {self.allowed}")


def _is_int(v: Any, minimum: int = 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= minimum


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _data_spec(v: Any) -> bool:
    return _accepted(parse_data_spec, v)


def _student_spec(v: Any) -> bool:
    return isinstance(v, str) and _accepted(resolve_student, v)


def _accepted(parse: Callable[[Any], Any], v: Any) -> bool:
    try:
        parse(v)
    except MonomodError:
        return False
    return True


def _parse_int(text: str) -> Any:
    """An integer, or the text itself (refused by the option's check, in its own words): a 5000-digit seed is one
    short line, not Python's int-size error."""
    try:
        return int(text.strip()) if len(text.strip()) < 100 else text
    except ValueError:
        return text


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _choice(name: str, choices: tuple[Any, ...], default: Any, help: str = "", **kwargs: Any) -> Option:
    words = "one of " + ", ".join("null" if c is None else str(c) for c in choices)
    return Option(name, default, lambda v: v in choices, words, help, choices=choices, **kwargs)


def _flag(name: str, help: str, **kwargs: Any) -> Option:
    return Option(name, False, lambda v: isinstance(v, bool), "true or false", help, kind=bool, **kwargs)


_POSITIVE_OR_NULL = "a positive integer or null"

OPTIONS: tuple[Option, ...] = (
    Option("description", None, lambda v: isinstance(v, str) and v.strip() != "" and "\n" not in v.strip(),
           "a one-line string", field=False),
    Option("teacher", None, lambda v: isinstance(v, str) and v != "",
           "a model name (timm name, alias or pkg.mod:factory)", label="MODEL"),
    Option("student", None, _student_spec, "one of " + ", ".join(STUDENT_KINDS) + ", a timm model name or "
           "pkg.module:factory", "Student: nac, moe, vit, a timm model name or pkg.module:factory (required "
           "without --recipe).", flag="--to", choices=STUDENT_KINDS, cli_choice=False, label="student --to"),
    Option("modules", None, lambda v: _is_int(v, 1), "an integer >= 2 (>= 3 for nac)",
           "Number of modules (stages) to distil (required without --recipe and --cuts).", flag="--modules",
           short="-k", kind=int, must="at least 1", fix="a nac student needs --modules 3 or more, moe and vit 2"),
    Option("cuts", None, _optional(lambda v: (isinstance(v, str) and v.strip(",").strip() != "") or (
        isinstance(v, list) and all(isinstance(c, str) and c for c in v))),
           "a list of module paths or fx node names (or one comma-separated string), or null",
           "Manual cut points, comma-separated: where each new teacher module begins (e.g. blocks.3,blocks.6); "
           "default: the exact most balanced cut. Recorded in plan.yaml.", flag="--cuts", parse=lambda text: [
               c.strip() for c in text.split(",") if c.strip()], fix="name cut points, e.g. --cuts blocks.4,blocks.8"),
    _choice("cost", COSTS, "flops", "What the teacher's modules are balanced by.", flag="--cost"),
    Option("tolerance", TOLERANCE, lambda v: _is_num(v) and v >= 0, "a number >= 0",
           "Accepted imbalance of the teacher's modules (max/mean cost <= 1 + tolerance): inspect says when even the optimum is above it.", flag="--tolerance",
           kind=float),
    Option("data", "digits", _data_spec, "digits, synthetic or imagefolder:PATH (optionally with shots=N)",
           "digits | synthetic | imagefolder:PATH (train/ and val/); few labels: digits:shots=5, "
           "imagefolder:PATH,shots=5.", flag="--data"),
    Option("ood", "auto", lambda v: v is None or v in ("auto", "compound", "none") or (
        isinstance(v, str) and v.startswith("imagefolder:") and len(v) > 12),
           "auto, compound, none, null or imagefolder:PATH",
           "OOD split: auto (digits: one corruption per image), compound (digits: rotation, blur and occlusion at "
           "once), none, or imagefolder:PATH.", flag="--ood"),
    _choice("preset", PRESETS, "demo", "Training budgets.", flag="--preset"),
    _choice("meta", META_KINDS, "trained", "Context for the module pairs: a trained meta model, or the teacher's "
            "own modules.", flag="--meta"),
    Option("img_size", None, _optional(_is_int), _POSITIVE_OR_NULL,
           "Input resolution (default: the preset's, else the teacher's).", flag="--img-size", kind=int,
           must="at least 1", fix="pass --img-size 1 or more"),
    Option("in_chans", None, _optional(lambda v: _is_int(v) and v <= MAX_IN_CHANS),
           f"null or an integer in [1, {MAX_IN_CHANS}]", "Input channels (default: the teacher's).",
           flag="--in-chans", kind=int, must=lambda v: f"at most {MAX_IN_CHANS}" if _is_int(v) else "at least 1",
           fix=f"pass --in-chans 1 to {MAX_IN_CHANS}"),
    Option("weights", None, _optional(lambda v: isinstance(v, str) and v != ""), "a path to .safetensors/.pth, or null",
           "Local teacher weights (.safetensors or .pth).", flag="--weights"),
    _flag("pretrained", "Download the teacher's pretrained weights through timm (needs network).", flag="--pretrained"),
    _flag("teacher_trained", "The teacher already knows this data (same as --teacher-training none).",
          flag="--teacher-trained"),
    _choice("teacher_training", (None, *TEACHER_TRAININGS), None,
            "How the teacher is trained: Deep Incubation in the meta model (default with --meta trained), end to end "
            "and apart (default with --meta teacher), or not at all (a given teacher).", flag="--teacher-training"),
    _choice("distill_targets", DISTILL_TARGETS, "incubated",
            "Under incubation: distil the incubated modules (the default, see README), or the fine-tuned "
            "teacher's modules (as the reference).", flag="--distill-targets", label="distill_targets"),
    Option("distill_data", None, _optional(_data_spec), "null, digits, synthetic or imagefolder:PATH",
           "Data of the teacher, meta, incubate and m2mKD jobs (default: --data); fine-tune, baseline and evaluation "
           "use --data.", flag="--distill-data"),
    Option("student_preset", None, _optional(lambda v: isinstance(v, str)), "a preset of the student family, or null",
           "Student preset (see `monomod student KIND --help`).", flag="--student-preset"),
    Option("student_overrides", None, lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
           "a mapping of student config fields"),
    _choice("stitch", (None, *STITCHES), None,
            "Stitch layers (default: the reference's per family).", flag="--stitch"),
    _choice("assemble", ASSEMBLY_MODES, "bridged",
            "How the distilled stages are assembled: keep each boundary's post-stitch and the next pre-stitch, fused "
            "into one layer where both are linear, so the assembled student computes through the meta model's "
            "boundary space as its hybrids did (the default, see README), or drop the stitch layers as the reference "
            "does.", flag="--assemble"),
    _flag("upcycle", "MoE: initialise experts from the teacher's MLPs (beyond the paper).", flag="--upcycle"),
    Option("alpha", 0.5, lambda v: _is_num(v) and 0 <= v <= 1, "a number in [0, 1]",
           "Weight of the distillation term.", flag="--alpha", kind=float),
    Option("tau", 1.0, lambda v: _is_num(v) and v > 0, "a number > 0", "Distillation temperature.", flag="--tau",
           kind=float),
    _choice("kd", ("soft", "hard"), "soft", "Distil the teacher's soft or hard (argmax) targets.", flag="--kd",
            label="distillation target"),
    _choice("kl_norm", (None, "batchmean", "reference"), None,
            "KL averaging: per sample (demo default), or per sample and class as the reference code does "
            "(paper default).", flag="--kl-norm", label="KL normalisation"),
    Option("feature_loss", 0.0, lambda v: _is_num(v) and v >= 0, "a number >= 0",
           "Weight of a boundary MSE loss (beyond the paper).", flag="--feature-loss", kind=float, must="0 or more"),
    Option("boundary_loss", None, _optional(lambda v: _is_num(v) and v >= 0), "null or a number >= 0",
           "Weight of a loss pulling each stitched student stage's output toward the meta model's own stage output, "
           "so the distilled stages chain when assembled (beyond the paper; default: the student family's, "
           "monomod.students.FAMILIES).", flag="--boundary-loss", kind=float, must="0 or more"),
    Option("seed", 0, lambda v: _is_int(v, 0) and v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]", flag="--seed",
           kind=int, fix="pass a smaller seed, e.g. --seed 0", parse=lambda text: _parse_int(text)),
    Option("teacher_seed", None, _optional(lambda v: _is_int(v, 0) and v <= MAX_SEED),
           f"null or an integer in [0, {MAX_SEED}]",
           "Seed of the teacher side (teacher, meta model, incubation; default: --seed). Runs that vary --seed with "
           "one --teacher-seed share one teacher and meta model under --reuse, as they would share a pretrained "
           "teacher.", flag="--teacher-seed", kind=int, fix="pass a smaller seed, e.g. --teacher-seed 0",
           parse=lambda text: _parse_int(text)),
    Option("meta_width", None, _optional(_is_int), _POSITIVE_OR_NULL,
           "Width of the trained meta model (default: the teacher's boundary width)."),
    Option("budgets", None, lambda v: isinstance(v, dict), "a mapping: job kind -> {steps|epochs, lr, batch_size, ...}"),
    _choice("precision", PRECISIONS, "fp32", "Training precision: fp32, bf16 autocast, or auto = bf16 where the job "
            "runs on CUDA or on a CPU with native bf16, fp32 elsewhere (the plan records auto; each job resolves it "
            "where it runs and records what it used: `monomod plan show`). fp32 by default (README: Precision and compilation).",
            flag="--precision"),
    _choice("input_path", ("auto", "cpu", "device", "cached"), "auto",
            "Where training batches are augmented: image by image on the CPU (loader workers), or on the training "
            "device a batch at a time: in-memory sets (digits, synthetic) kept there as uint8 tensors, image folders "
            "decoded there (nvJPEG on CUDA). cached: an image folder decoded once into a pre-resized copy kept on the "
            "device (and in RUN_DIR/cache). auto: device on CUDA for in-memory sets, cpu otherwise, resolved where "
            "each job runs.", flag="--input-path"),
    _choice("m2mkd", ("auto", "separate", "fused"), "auto",
            "The K m2mKD jobs as K separate jobs (each loads the data and runs the meta prefix itself; K machines can "
            "share them) or as one fused job that loads each batch once, runs the meta prefix once and steps all K "
            "students on it (README: Fused m2mKD). auto: separate on every device for now; decided when the plan is "
            "compiled, since it shapes the plan.", flag="--m2mkd"),
    # how a job runs, not what it computes: never in a job hash (flags shared with `monomod run`, but --compile)
    _flag("compile", "torch.compile each training job's step (its trainable and frozen context); the compile time "
          "counts in the job's time. Not part of job hashes.", flag="--compile"),
    Option("checkpoint_every", 0, lambda v: _is_int(v, 0), "an integer >= 0 (steps; 0 = by time only)"),
    Option("checkpoint_minutes", 10.0, lambda v: _is_num(v) and v >= 0, "a number >= 0 (minutes; 0 = by steps only)"),
    Option("threads", None, _optional(_is_int), "a positive integer or null (torch threads per job; null = auto: "
           "each executor allots every job its share of the cores where it runs)"),
    Option("loader_workers", None, _optional(lambda v: _is_int(v, 0)),
           "an integer >= 0 (data-loader workers per job) or null"),
    Option("data_info", None, lambda v: isinstance(v, dict) and set(v) <= {"num_classes", "train_size"}
           and all(_is_int(x) for x in v.values()), "a mapping with num_classes and train_size (integers)",
           field=False),
)
SPEC: dict[str, Option] = {o.name: o for o in OPTIONS}
# Flags of the other commands (inspect, student, export) that convert lacks; checked by ``check_values`` like the rest.
COMMAND_OPTIONS: dict[str, Option] = {o.name: o for o in (
    Option("num_classes", None, _optional(_is_int), _POSITIVE_OR_NULL, flag="--num-classes", kind=int,
           must="at least 1", fix="pass --num-classes 1 or more", field=False),
)}
REQUIRED = ("teacher", "student", "modules")


def _field(option: Option) -> tuple[str, Any, Any]:
    if option.name in REQUIRED:
        return option.name, Any
    if option.name in ("student_overrides", "budgets"):
        return option.name, dict, field(default_factory=dict)
    return option.name, Any, field(default=option.default)


ConvertOptions = dataclasses.make_dataclass("ConvertOptions", [_field(o) for o in OPTIONS if o.field])
ConvertOptions.__module__ = __name__
ConvertOptions.__doc__ = ("Everything `monomod convert` is asked for, one field per option of ``OPTIONS`` (same name, "
                          "same default); ``compile_options`` turns it into a Plan.")


def validate(values: Mapping[str, Any], source: str | None = None, *, partial: bool = False) -> None:
    """Refuse, in one line, a value an option does not allow or a combination that cannot run.

    ``source`` names where the values came from (a recipe file, ``--set``) and leads every message; without it
    the messages name the flags. ``partial`` checks each given value alone (overrides, merged and checked later).
    """
    where = f"{source}: " if source else ""
    missing = [SPEC[k].flag or SPEC[k].label for k in REQUIRED if values.get(k) is None]
    if missing and not partial:
        raise MonomodError(f"{where}convert needs {', '.join(missing)}", "pass them, or start from a --recipe")
    for key, value in values.items():
        option = SPEC.get(key)
        if option is None:
            raise MonomodError(f"{where}unknown key {key!r}", f"allowed keys: {', '.join(SPEC)}")
        if not option.allows(value) and not (value is None and option.name in REQUIRED and partial):
            if source:
                raise MonomodError(f"{source}: {key}: {shorten(repr(value))} is not allowed", f"use {option.allowed}")
            raise option.problem(value)
    try:
        _check_budgets(values.get("budgets") or {})
        if not partial:
            _check_combinations({**{o.name: o.default for o in OPTIONS}, **values})
    except MonomodError as e:
        raise MonomodError(f"{where}{e.problem}", e.fix) from None


def check_values(values: Mapping[str, Any]) -> None:
    """The option spec's check of each value a command was given (None: not given), in the words of its flag: the
    one check that ``inspect``, ``student`` and ``export`` share with ``convert`` and ``--set`` (a negative or NaN
    --tolerance, an empty --cuts, a --num-classes below 1 are refused the same way everywhere)."""
    for name, value in values.items():
        option = SPEC.get(name) or COMMAND_OPTIONS[name]
        if value is not None and not option.allows(value):
            raise option.problem(value)


def _check_combinations(o: Mapping[str, Any]) -> None:
    """What no single option decides: modules per student family, how the teacher is trained, ..."""
    student = o["student"]
    minimum = student_family(student).min_modules
    if o["modules"] < minimum:
        detail = "tokenizer+read-in, >=1 propagator, read-out" if student == "nac" else "a first and a last stage"
        raise MonomodError(f"a {student} student needs at least {minimum} modules ({detail}); got K={o['modules']}",
                           f"pass --modules {minimum} or more")
    if o["cuts"] is not None and len(o["cuts"]) + 1 != o["modules"]:
        raise MonomodError(f"{len(o['cuts'])} cuts make {len(o['cuts']) + 1} modules, not {o['modules']}",
                           "drop --modules or give K-1 cuts")
    _check_teacher_training(o)
    if o["upcycle"] and student != "moe":
        raise MonomodError(f"--upcycle initialises MoE experts; a {student} student has none",
                           "drop --upcycle or use --to moe")
    if o["feature_loss"] and student == "nac":
        raise MonomodError("--feature-loss needs the student's boundaries to carry the teacher's tokens; a NAC's carry "
                           "its latents (another count)", "drop --feature-loss for nac, or use --to moe / vit")
    if o["meta_width"] is not None and o["meta"] == "teacher":
        raise MonomodError(f"meta_width={o['meta_width']!r} is invalid here", "give a positive integer, with meta=trained")
    presets = student_family(student).preset_names()
    if o["student_preset"] is not None and not presets:
        raise MonomodError(f"student_preset: {student!r} has no presets (they belong to "
                           f"{', '.join(k for k, f in FAMILIES.items() if f.presets)})",
                           "drop student_preset, or set the model's own arguments with student_overrides")
    if o["student_preset"] is not None:
        if o["student_preset"] not in presets:
            raise MonomodError(f"student_preset: {o['student_preset']!r} is not a {student} preset",
                               f"use one of {', '.join(sorted(presets))}")


def _check_teacher_training(o: Mapping[str, Any]) -> None:
    training = resolve_teacher_training(o["teacher_training"], o["teacher_trained"], o["meta"])
    if o["teacher_trained"] and training != "none":
        raise MonomodError(f"--teacher-trained says the teacher needs no training, but --teacher-training is {training}",
                           "drop --teacher-trained, or use --teacher-training none")
    if training == "incubate" and o["meta"] == "teacher":
        raise MonomodError("Deep Incubation trains the teacher's modules inside a trained meta model, but --meta is teacher",
                           "use --meta trained, or --teacher-training end-to-end|none")
    if training == "none" and not (o["weights"] or o["pretrained"] or o["teacher_trained"]):
        raise MonomodError("--teacher-training none keeps the teacher as it is, but no trained weights are given",
                           "pass --weights FILE or --pretrained, or use --teacher-training incubate")


def _check_budgets(budgets: Mapping[str, Any]) -> None:
    for kind, override in budgets.items():
        if kind not in BUDGET_KINDS:
            raise MonomodError(f"budgets has an unknown job kind {kind!r}", f"use {', '.join(BUDGET_KINDS)}")
        if not isinstance(override, dict):
            raise MonomodError(f"budgets.{kind}: {shorten(repr(override))} is not a mapping",
                               f"give a mapping of {', '.join(BUDGET_KEYS)}")
        for key in override:
            if key not in BUDGET_KEYS:
                raise MonomodError(f"budgets.{kind}.{key}: unknown key", f"use {', '.join(BUDGET_KEYS)}")
        for pair in (("steps", "epochs"), ("warmup_steps", "warmup_epochs")):
            if all(key in override for key in pair):
                raise MonomodError(f"budgets.{kind} gives both {pair[0]} and {pair[1]}", "keep one of them")
        for key, value in override.items():
            if not _budget_value_ok(key, value):
                raise MonomodError(f"budgets.{kind}.{key}={shorten(repr(value))} is invalid",
                                   "give a finite non-negative number (an integer >= 1 for steps, epochs and batch_size)")


def _budget_value_ok(key: str, value: Any) -> bool:
    if key in ("steps", "epochs", "warmup_steps", "warmup_epochs", "batch_size"):
        return _is_int(value, 0 if "warmup" in key else 1)
    if key == "grad_clip":
        return value is None or (_is_num(value) and value >= 0)
    if key == "auto_augment":
        return value is None or (isinstance(value, str) and value != "")
    return _is_num(value) and value >= 0


def convert_options(values: Mapping[str, Any]) -> Any:
    """A ConvertOptions from option values (unchecked): ``ood: none`` means no OOD split, a comma string of cuts is
    a list, and K follows from the cuts when only they are given."""
    kwargs = {k: v for k, v in values.items() if k in SPEC and SPEC[k].field}
    if kwargs.get("ood") == "none":
        kwargs["ood"] = None
    if isinstance(kwargs.get("cuts"), str):
        kwargs["cuts"] = [c.strip() for c in kwargs["cuts"].split(",") if c.strip()]
    if kwargs.get("modules") is None and kwargs.get("cuts"):
        kwargs["modules"] = len(kwargs["cuts"]) + 1
    kwargs["budgets"] = {k: dict(v) if isinstance(v, dict) else v for k, v in (kwargs.get("budgets") or {}).items()}
    kwargs["student_overrides"] = dict(kwargs.get("student_overrides") or {})
    kwargs.setdefault("modules", None)
    return ConvertOptions(**{"teacher": None, "student": None, **kwargs})


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def click_options(command: Callable) -> Callable:
    """Decorate ``command`` with one click option per flagged Option; each arrives under its option's name."""
    import click

    for option in reversed([o for o in OPTIONS if o.flag]):
        names = [n for n in (option.short, option.flag, option.name) if n]
        default = None if option.name in REQUIRED else option.default
        if option.kind is bool:
            decorator = click.option(*names, is_flag=True, help=option.help)
        elif option.parse is not None:
            decorator = click.option(*names, type=str, callback=lambda ctx, param, v, o=option: None if v is None
                                     else o.parse(str(v)), default=default, help=option.help,
                                     show_default=default is not None)
        elif option.choices is not None and option.cli_choice:
            choices = [str(c) for c in option.choices if c is not None]
            decorator = click.option(*names, type=click.Choice(choices), default=default, help=option.help,
                                     show_default=default is not None)
        else:
            decorator = click.option(*names, type=option.kind, default=default, help=option.help,
                                     show_default=default is not None)
        command = decorator(command)
    return command
