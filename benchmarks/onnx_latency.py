"""Per-stage latency on the CPU: onnxruntime against torch eager, for students' stages and teacher modules.

Each stage is exported with ``monomod.passes.export`` (checked against torch: the max abs difference is in the
table), then timed at batch 1 (serving latency) and at a throughput batch, each runtime in turn on the same inputs
(median of the repeats after warm-up, ``torch.inference_mode``). Both runtimes get the same thread count.
Latency does not depend on what the weights have learned, so the students are freshly initialised.
"""
from __future__ import annotations

import statistics
import tempfile
from typing import Any

import torch

from monomod.frontend import load_model
from monomod.passes.export import export_all, student_stage_exportables, teacher_exportables
from monomod.passes.partition import partition
from monomod.passes.trace import trace
from monomod.students import build_student

# (label, kind, spec, modules, img_size, batches, repeats)
CASES: list[tuple[str, str, str, int, int, tuple[int, int], int]] = [
    ("NAC student (demo)", "student", "nac", 4, 32, (1, 64), 30),
    ("MoE student (demo)", "student", "moe", 4, 32, (1, 64), 30),
    ("vit_tiny teacher", "teacher", "vit_tiny", 4, 32, (1, 64), 30),
    ("vit_base teacher", "teacher", "vit_base", 4, 224, (1, 8), 7),
]
QUICK_CASES = [("NAC student (demo)", "student", "nac", 3, 32, (1, 8), 3),
               ("vit_tiny teacher", "teacher", "vit_tiny", 2, 32, (1, 8), 3)]
THREADS = (1, 2)


def _items(kind: str, spec: str, modules: int, img_size: int) -> list:
    torch.manual_seed(0)
    common = {"source": "benchmark", "teacher": spec if kind == "teacher" else "-", "student": spec if kind == "student" else "-"}
    if kind == "student":
        overrides = {"patch_size": 16} if spec == "moe" else {}  # the demo's MoE: vit_tiny's token grid
        student = build_student(spec, modules=modules, num_classes=10, img_size=img_size, **overrides)
        return student_stage_exportables(student, (3, img_size, img_size), common)
    model = load_model(spec, img_size=img_size, num_classes=10).eval()
    traced = trace(model, torch.zeros(1, 3, img_size, img_size), name=spec)
    return teacher_exportables(partition(traced, modules), common)


def run(quick: bool = False) -> dict[str, Any]:
    rows = []
    threads_before = torch.get_num_threads()
    try:
        for label, kind, spec, modules, img_size, batches, repeats in (QUICK_CASES if quick else CASES):
            items = _items(kind, spec, modules, img_size)
            with tempfile.TemporaryDirectory() as tmp:
                for threads in (THREADS[:1] if quick else THREADS):
                    torch.set_num_threads(threads)  # export_all gives onnxruntime the same count
                    results = export_all(items, tmp, bench_batches=batches, repeats=repeats)
                    for r in results:
                        for batch, ms in r.latency_ms.items():
                            rows.append({"model": label, "stage": r.name, "threads": threads, "batch": batch,
                                         "torch_ms": ms["torch"], "onnxruntime_ms": ms["onnxruntime"],
                                         "speedup": round(ms["torch"] / ms["onnxruntime"], 2),
                                         "max_abs_diff": r.max_diff, "exporter": r.exporter})
                    print(f"  {label}, {threads} thread(s): {len(results)} stages", flush=True)
    finally:
        torch.set_num_threads(threads_before)
    return {"rows": rows, "img_sizes": {c[0]: c[4] for c in (QUICK_CASES if quick else CASES)}}


def markdown(result: dict[str, Any]) -> str:
    lines = ["Median ms per forward; speed-up = torch / onnxruntime (> 1: onnxruntime is faster). Image sizes: "
             + ", ".join(f"{k} {v} px" for k, v in result["img_sizes"].items()) + ".", "",
             "| model | stage | threads | batch | torch eager (ms) | onnxruntime (ms) | speed-up | max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['stage']} | {r['threads']} | {r['batch']} | {r['torch_ms']:.3f} | "
                     f"{r['onnxruntime_ms']:.3f} | {r['speedup']:.2f} | {r['max_abs_diff']:.1e} |")
    speedups = {}
    for r in result["rows"]:
        speedups.setdefault((r["threads"], r["batch"]), []).append(r["speedup"])
    lines += ["", "| threads | batch | median speed-up over stages | range |", "|---:|---:|---:|---|"]
    for (threads, batch), values in sorted(speedups.items()):
        lines.append(f"| {threads} | {batch} | {statistics.median(values):.2f} | {min(values):.2f}–{max(values):.2f} |")
    return "\n".join(lines) + "\n"
