"""Export pass: a run's trained modules (or a partitioned teacher) -> ONNX files, each checked against torch.

What a run exports (``what``):

``stages``
    ``stage_{i}.onnx``: the K stages **of the run's student** as it is deployed, by default the fine-tuned one
    (``source="finetune"``; ``source="assemble"`` gives the distilled stages as assembled, before end-to-end
    training: those are exactly the m2mKD products with their stitch layers dropped, since assembly checks that
    every distilled tensor landed). Why the student's stages and not the m2mKD job products as trained: a
    distilled stage was trained inside the meta model, on the teacher's token count (e.g. 5 tokens for a
    ``vit_tiny`` at 32 px) and, for NAC, on the simplified dense path; in the student it runs on its own tokens
    (NAC: the ``L_in + L_med`` cells, with the signature kernel). The student's stages chain, file by file, into
    ``student.onnx``, which is what a pipeline-parallel server needs; the stitches only exist for distillation.
    Boundaries are named so that consecutive files fit together: ``images -> tokens_1 -> ... -> logits``.
``student``
    ``student.onnx``: the same student wrapped as ``monomod.api.DeployedStudent``: it takes **raw images
    in [0, 1]** and normalises them itself with the data set's mean/std (recorded in the metadata). We export this
    rather than the bare student because it is what ``monomod.load_student`` returns, and a server then needs no
    knowledge of the training data. ``stage_0.onnx`` takes *normalised* images (its metadata says so).
``teacher``
    ``teacher_{i}.onnx``: ``extract(partition)`` of the run's adapted teacher, boundaries named after the fx values
    that cross each cut (module i's outputs are module i+1's inputs, by name).

Every file gets a dynamic batch axis, holds its parameters as initializers (never as graph inputs), carries
metadata props (``monomod_version``, ``kind``, ``index``, ``interface``, ``inputs``, ``outputs``, ...), passes
``onnx.checker.check_model(full_check=True)`` and is compared with torch eager in eval mode (NAC's link sampling
off) on fresh random inputs at two batch sizes. Export uses the modern exporter (``torch.onnx.export(...,
dynamo=True, dynamic_shapes=...)``); only a module it fails on goes through the TorchScript exporter, and the
result says so.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import statistics
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from monomod.version import __version__
from monomod.errors import MonomodError, first_line, shorten
from monomod.io import read_json

EXPORT_WHATS: tuple[str, ...] = ("stages", "student", "teacher")
TOLERANCE = 1e-4  # max abs difference onnxruntime vs torch that counts as a pass
CHECK_BATCHES: tuple[int, int] = (2, 5)
EXAMPLE_BATCH = 2  # export example; not 1, which torch.export would specialise
_SINGLE_FILE_LIMIT = 1_800_000_000  # protobuf caps a model file at 2 GiB: larger weights go to external data


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: its name and shape, the batch axes written as ``"B"``."""

    name: str
    shape: tuple[int | str, ...]
    draw: str = "normal"  # random test inputs: "normal" (tokens, normalised images) or "uniform" (raw [0, 1] images)

    def concrete(self, batch: int) -> tuple[int, ...]:
        return tuple(batch if d == "B" else int(d) for d in self.shape)

    @property
    def batch_axes(self) -> list[int]:
        return [i for i, d in enumerate(self.shape) if d == "B"]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass
class Exportable:
    """A module to export: file stem, the eval-mode module, its boundary and the metadata to record."""

    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, Any] = field(default_factory=dict)

    def random_inputs(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        out = []
        for spec in self.inputs:
            shape = spec.concrete(batch)
            draw = torch.rand if spec.draw == "uniform" else torch.randn
            out.append(draw(shape, generator=generator))
        return tuple(out)


@dataclass
class ExportResult:
    """What happened to one Exportable."""

    name: str
    path: Path
    bytes: int
    exporter: str  # "dynamo" or "torchscript"
    max_diff: float  # over both check batches and every output; inf if onnxruntime failed
    note: str = ""  # why the fallback was needed, or why the check failed
    latency_ms: dict[int, dict[str, float]] = field(default_factory=dict)  # batch -> {"onnxruntime", "torch"}

    @property
    def ok(self) -> bool:
        return self.max_diff <= TOLERANCE

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "file": self.path.name, "bytes": self.bytes, "exporter": self.exporter,
                "max_diff": self.max_diff if math.isfinite(self.max_diff) else None, "ok": self.ok,
                "note": self.note, "latency_ms": {str(b): v for b, v in self.latency_ms.items()}}


# ----------------------------------------------------------------------------------------------- what to export


def parse_what(text: str | Iterable[str]) -> list[str]:
    """``"stages,student"`` / ``"all"`` -> the kinds to export, in EXPORT_WHATS order."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if "all" in parts:
        return list(EXPORT_WHATS)
    unknown = [p for p in parts if p not in EXPORT_WHATS]
    if unknown or not parts:
        raise MonomodError(f"unknown --what {','.join(unknown) or text!r}",
                           f"use all or a comma list of {', '.join(EXPORT_WHATS)}")
    return [w for w in EXPORT_WHATS if w in parts]


def student_stage_exportables(student: nn.Module, input_size: Sequence[int], common: dict[str, Any],
                              normalisation: dict[str, Any] | None = None) -> list[Exportable]:
    """One Exportable per stage of a StagedModel, with input shapes found by running the chain once."""
    student.eval()
    stages = list(student.stages)
    k = len(stages)
    items = []
    x = torch.zeros(EXAMPLE_BATCH, *input_size)
    for i, stage in enumerate(stages):
        name_in = "images" if i == 0 else f"tokens_{i}"
        name_out = "logits" if i == k - 1 else f"tokens_{i + 1}"
        spec_in = TensorSpec(name_in, ("B", *x.shape[1:]))
        with torch.no_grad():
            y = stage(x)
        spec_out = TensorSpec(name_out, ("B", *y.shape[1:]))
        interface = stage.interface.to_json() if hasattr(stage, "interface") else None
        meta = {**common, "kind": "student_stage", "index": i, "num_stages": k, "interface": interface,
                "stage_class": type(stage).__name__}
        if i == 0 and normalisation:
            meta["input_range"] = "normalised images: (raw - mean) / std"
            meta["normalisation"] = normalisation
        items.append(Exportable(f"stage_{i}", stage, [spec_in], [spec_out], meta))
        x = y
    return items


def teacher_exportables(partition, common: dict[str, Any]) -> list[Exportable]:
    """One Exportable per teacher module of ``partition`` (``extract``), named by their boundary values."""
    from monomod.passes.extract import extract

    modules = extract(partition)
    k = len(modules)
    items = []
    for spec, module in zip(partition.modules, modules):
        inputs = [_boundary_spec(v, f"module {spec.index} input") for v in spec.inputs]
        module.eval()
        if spec.index == k - 1:  # the model's output: learn its shape by running the module
            outputs = output_specs(module, inputs, ["logits"])
        else:
            outputs = [_boundary_spec(v, f"module {spec.index} output") for v in spec.outputs]
        meta = {**common, "kind": "teacher_module", "index": spec.index, "num_stages": k,
                "covers": list(spec.covers), "model": partition.traced.name}
        items.append(Exportable(f"teacher_{spec.index}", module, inputs, outputs, meta))
    return items


def _boundary_spec(value, where: str) -> TensorSpec:
    if value.shape is None:
        raise MonomodError(f"{where} {value.name!r} is not a tensor ({value.dtype or 'a Python value'}); ONNX graphs "
                           "take tensors only", "choose other cut points (--cuts) or fewer modules")
    if "B" not in value.shape:
        raise MonomodError(f"{where} {value.name!r} has no batch axis", "choose other cut points (--cuts)")
    return TensorSpec(value.name, tuple(value.shape))


def output_specs(module: nn.Module, inputs: Sequence[TensorSpec], names: list[str]) -> list[TensorSpec]:
    """Output specs found by running at two batch sizes: axes that change with the batch become ``"B"``."""
    shapes = []
    for batch in (EXAMPLE_BATCH, EXAMPLE_BATCH + 1):
        with torch.no_grad():
            out = module(*(torch.zeros(s.concrete(batch)) for s in inputs))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        shapes.append([tuple(o.shape) for o in outs])
    if len(shapes[0]) != len(names):
        names = [f"output_{j}" for j in range(len(shapes[0]))]
    return [TensorSpec(n, tuple("B" if a != b else a for a, b in zip(s2, s3)))
            for n, s2, s3 in zip(names, shapes[0], shapes[1])]


# ----------------------------------------------------------------------------------------------- export + check


MIN_OPSET = 7  # the oldest opset the TorchScript fallback writes


def export_one(item: Exportable, out_dir: Path, *, opset: int | None = None) -> tuple[Path, str, str]:
    """Write ``out_dir/<name>.onnx``; returns (path, exporter used, note on a fallback)."""
    path = out_dir / f"{item.name}.onnx"
    item.module.eval()
    example = item.random_inputs(EXAMPLE_BATCH, torch.Generator().manual_seed(0))
    input_names = [s.name for s in item.inputs]
    output_names = [s.name for s in item.outputs]
    large = sum(p.numel() * p.element_size() for p in item.module.parameters()) > _SINGLE_FILE_LIMIT
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    note = ""
    try:
        batch = torch.export.Dim("B", min=1)
        dynamic = tuple({axis: batch for axis in s.batch_axes} for s in item.inputs)
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(item.module, example, dynamo=True, dynamic_shapes=dynamic,
                                        input_names=input_names, output_names=output_names, opset_version=opset,
                                        verbose=False)
        for key, value in _metadata(item).items():
            program.model.metadata_props[key] = value
        program.save(str(path), external_data=large)
        return path, "dynamo", note
    except Exception as e:  # noqa: BLE001 - any exporter failure falls back, with the reason shown
        note = f"dynamo exporter failed ({first_line(e, with_type=True, limit=160)}); used TorchScript"
    import onnx

    try:
        with _quiet(), torch.no_grad():
            torch.onnx.export(item.module, example, str(path), dynamo=False, input_names=input_names,
                              output_names=output_names, opset_version=opset or 17,
                              dynamic_axes={s.name: {a: "B" for a in s.batch_axes} for s in (*item.inputs, *item.outputs)})
    except Exception as e:  # noqa: BLE001
        raise MonomodError(f"cannot export {item.name} to ONNX: {note}; TorchScript exporter failed too "
                           f"({first_line(e, with_type=True, limit=160)})", "report this with the model name") from None
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, _metadata(item))
    onnx.save(model, str(path), save_as_external_data=large)
    return path, "torchscript", note


@contextlib.contextmanager
def _quiet():
    """The exporters' warnings and the ONNX optimizer's log lines are noise in a CLI table: hold them back."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [logger.level for logger in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger in loggers:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _metadata(item: Exportable) -> dict[str, str]:
    props = {"monomod_version": __version__,
             "inputs": json.dumps([s.to_json() for s in item.inputs]),
             "outputs": json.dumps([s.to_json() for s in item.outputs])}
    for key, value in item.metadata.items():
        props[key] = value if isinstance(value, str) else json.dumps(value)
    return props


def check_file(path: Path, item: Exportable) -> None:
    """onnx's full checker, plus: graph inputs are exactly the declared tensors (parameters are initializers)
    and the batch axes are symbolic."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = [i.name for i in model.graph.input]
    initializers = {i.name for i in model.graph.initializer}
    expected = [s.name for s in item.inputs]
    if graph_inputs != expected or initializers.intersection(graph_inputs):
        raise MonomodError(f"{path.name}: graph inputs {graph_inputs} are not exactly {expected} "
                           "(parameters must be initializers)", "report this as a bug")
    for value, spec in zip(model.graph.input, item.inputs):
        dims = value.type.tensor_type.shape.dim
        baked = [a for a in spec.batch_axes if not dims[a].dim_param]
        if baked:
            raise MonomodError(f"{path.name}: input {spec.name!r} has a fixed batch axis", "report this as a bug")


def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # same threads as torch: a fair latency comparison
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(item: Exportable, session, batches: Sequence[int] = CHECK_BATCHES, seed: int = 1234) -> float:
    """Max abs difference between onnxruntime and torch eager on fresh random inputs at each batch size."""
    worst = 0.0
    generator = torch.Generator().manual_seed(seed)
    for batch in batches:
        inputs = item.random_inputs(batch, generator)
        with torch.no_grad():
            expected = item.module(*inputs)
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        got = session.run(None, {s.name: x.numpy() for s, x in zip(item.inputs, inputs)})
        for e, g in zip(expected, got):
            if tuple(e.shape) != tuple(g.shape):
                return math.inf
            worst = max(worst, float((e - torch.from_numpy(g)).abs().max()))
    return worst


def bench(item: Exportable, session, batch: int, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """Median wall time (ms) of one forward at ``batch``: onnxruntime session vs torch eager (no_grad)."""
    inputs = item.random_inputs(batch, torch.Generator().manual_seed(7))
    feed = {s.name: x.numpy() for s, x in zip(item.inputs, inputs)}

    def timed(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    with torch.inference_mode():
        eager = timed(lambda: item.module(*inputs))
    return {"onnxruntime": round(timed(lambda: session.run(None, feed)), 3), "torch": round(eager, 3)}


def export_all(items: Sequence[Exportable], out_dir: str | Path, *, opset: int | None = None,
               check_batches: Sequence[int] = CHECK_BATCHES, bench_batches: Sequence[int] = (),
               repeats: int = 20, on_result=None) -> list[ExportResult]:
    """Export, check and compare every item; write ``out_dir/export.json`` (a manifest of the files).

    Atomic: everything is written into a temporary sibling of ``out_dir`` that is swapped in at the end, so a killed
    export leaves the previous folder whole (never a manifest listing a deleted file); leftovers of killed exports
    are removed by the next one."""
    check_opset(opset)
    out = check_out_dir(out_dir)
    staging = _staging_dir(out)
    try:
        results = []
        for item in items:
            result = _export_checked(item, staging, opset, check_batches)
            session = _session(result.path) if bench_batches else None
            for batch in bench_batches:
                result.latency_ms[batch] = bench(item, session, batch, repeats)
            results.append(result)
            if on_result:
                on_result(result)
        manifest = {"monomod_version": __version__, "tolerance": TOLERANCE, "check_batches": list(check_batches),
                    "files": [{**r.to_json(), "inputs": [s.to_json() for s in i.inputs],
                               "outputs": [s.to_json() for s in i.outputs], "metadata": i.metadata}
                              for r, i in zip(results, items)]}
        (staging / "export.json").write_text(json.dumps(manifest, indent=2))
        _swap_in(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for r in results:
        r.path = out / r.path.name
    return results


def check_opset(opset: int | None) -> None:
    """An ``--opset`` the exporters can write, refused in one line before any export (None: the exporter's)."""
    import onnx

    latest = onnx.defs.onnx_opset_version()
    if opset is not None and not (isinstance(opset, int) and MIN_OPSET <= opset <= latest):
        raise MonomodError(f"--opset {shorten(str(opset))} is not an ONNX opset monomod can export to",
                           f"pass --opset {MIN_OPSET} to {latest}, or leave it out")


def _written_opset(path: Path, opset: int | None) -> None:
    """The file has the opset asked for: an exporter that could not convert keeps its own, which is an error here,
    not a silently ignored option."""
    import onnx

    if opset is None:
        return
    model = onnx.load(str(path), load_external_data=False)
    written = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:
        raise MonomodError(f"--opset {opset} cannot be met: the exporter wrote opset {written} for {path.stem}",
                           f"pass --opset {written}, or leave it out")


def _export_checked(item: Exportable, folder: Path, opset: int | None, check_batches: Sequence[int]) -> ExportResult:
    path, exporter, note = export_one(item, folder, opset=opset)
    _written_opset(path, opset)
    check_file(path, item)
    session = _session(path)
    try:
        diff = compare(item, session, check_batches)
    except Exception as e:  # noqa: BLE001 - onnxruntime refusing an input is a failed check, not a crash
        diff, note = math.inf, (note + "; " if note else "") + f"onnxruntime failed: {first_line(e, with_type=True, limit=160)}"
    size = path.stat().st_size + sum(f.stat().st_size for f in folder.glob(f"{item.name}.onnx.data"))
    return ExportResult(item.name, path, size, exporter, diff, note)


def check_out_dir(out_dir: str | Path) -> Path:
    """The ``--onnx`` folder, refused in one line before any work unless replacing it loses nothing: it must be new,
    empty, or hold only what an earlier export wrote (the files its export.json lists). A stray export.json is no
    proof: a file it does not list is the user's, and is never deleted."""
    if not str(out_dir).strip():
        raise MonomodError("--onnx is empty", "name a folder for the ONNX files, e.g. --onnx onnx/run")
    out = Path(out_dir)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise MonomodError(f"--onnx {shorten(str(out))!r} is a file", "choose a directory for the ONNX files")
    if out.is_dir() and any(out.iterdir()):
        listed = _exported_files(out)
        foreign = sorted(p.name for p in out.iterdir() if p.name not in listed or not p.is_file() or p.is_symlink())
        if foreign:
            what = "holds no export.json" if listed is None or not (out / "export.json").is_file() else \
                f"holds files its export.json does not list ({shorten(', '.join(foreign), 80)})"
            raise MonomodError(f"--onnx {shorten(str(out))!r} is not empty and {what}; it would be replaced",
                               "choose a new or empty folder for the ONNX files, or move those files")
    return out


def _exported_files(out: Path) -> set[str]:
    """The names an earlier export wrote into ``out``: export.json and the files (and external data) it lists."""
    manifest = read_json(out / "export.json")
    files = manifest.get("files") if isinstance(manifest, dict) else None
    names = {"export.json"} if isinstance(files, list) else set()
    for entry in files if isinstance(files, list) else []:
        name = entry.get("file") if isinstance(entry, dict) else None
        if isinstance(name, str) and name.endswith(".onnx") and Path(name).name == name:
            names |= {name, f"{name}.data"}
    return names


def _staging_dir(out: Path) -> Path:
    """A fresh temporary sibling of ``out`` (leftovers of killed exports removed); ``out`` is checked first
    (``check_out_dir``), because it is replaced whole."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for stale in out.parent.glob(f".{out.name}.export-*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = out.parent / f".{out.name}.export-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as e:
        raise MonomodError(f"cannot write next to --onnx {shorten(str(out))!r} ({e.strerror})",
                           "choose a writable folder with a shorter path") from None
    return staging


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by ``staging`` with renames: readers see the old export or the new one."""
    aside = out.parent / f".{out.name}.export-old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if out.exists():
        os.replace(out, aside)
    try:
        os.replace(staging, out)
    except BaseException:
        if aside.exists() and not out.exists():
            os.replace(aside, out)
        raise
    shutil.rmtree(aside, ignore_errors=True)


__all__ = ["CHECK_BATCHES", "EXPORT_WHATS", "ExportResult", "Exportable", "TOLERANCE", "TensorSpec", "bench",
           "check_file", "check_opset", "check_out_dir", "compare", "export_all", "export_one", "output_specs", "parse_what",
           "student_stage_exportables", "teacher_exportables"]
