"""Training throughput of one m2mKD job and one fine-tune-sized job: fp32 eager against bf16 autocast and
torch.compile, side by side in one run, on the demo settings and on a ``vit_small`` teacher at 224 px.

Each job runs through the plan machinery (``execute --only``) from the same RUN_DIR, whose teacher and meta model
were trained for one step (their quality does not change the cost of a step). The fine-tune-sized job is the
``baseline`` job: the same student, budget and loss as ``finetune``, without needing the assembled student.

Steady samples/s leave out the first logging window (warm-up, and for a compiled job its compile); the job's
``train seconds`` keep it. Achieved FLOP/s count a step's work from the trace pass's per-sample FLOPs (teacher
modules from the recorded partition, meta and student stages from ``stage_costs``): a trained part 3x its forward
(forward, input and weight gradients), the frozen meta suffix 3x (the teacher pair's forward, the student pair's
forward and input gradients), the frozen prefix and teacher module 1x. Peaks are this machine's measured
``torch.mm`` FLOP/s in fp32 and bf16 at the same thread count.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from monomod.compiler import ConvertOptions, compile_options
from monomod.runtime.execute import execute, prepare_run_dir

MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "fp32+compile": ("fp32", True)}
# name -> (convert options, batch size, {mode: (steps, log_every)}); bf16 runs fewer steps: where it is emulated
# (no native bf16) its matmuls run tens of times slower than fp32
SETTINGS = {
    "demo (vit_tiny, 32 px)": (dict(teacher="vit_tiny", student="nac", modules=4, data="digits"), 64,
                               {"fp32": (30, 5), "bf16": (6, 2), "fp32+compile": (30, 5)}),
    "vit_small, 224 px": (dict(teacher="vit_small", student="nac", modules=4, data="synthetic", img_size=224), 8,
                          {"fp32": (6, 1), "bf16": (3, 1), "fp32+compile": (6, 1)}),
}
# On a GPU: batches that fill it better, enough steps for steady windows, and bf16 with compile (the fast setting)
GPU_MODES = {"fp32": ("fp32", False), "bf16": ("bf16", False), "bf16+compile": ("bf16", True)}
GPU_SETTINGS = {
    "vit_small, 224 px": (SETTINGS["vit_small, 224 px"][0], 128, {mode: (40, 10) for mode in GPU_MODES}),
    "demo (vit_tiny, 32 px)": (SETTINGS["demo (vit_tiny, 32 px)"][0], 64,
                               {mode: (60, 10) for mode in GPU_MODES}),
}
JOBS = ("m2mkd:1", "baseline")


def run(quick: bool = False, on_row: Any = None) -> dict[str, Any]:
    """``on_row(row)`` sees each row as it is measured (a run cut short by a time limit keeps what it measured)."""
    threads = torch.get_num_threads()
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    peaks = {dtype: matmul_peak(dtype, quick, device) for dtype in ("fp32", "bf16")}
    print(f"  matmul peaks ({device}, {threads} threads): "
          + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()), flush=True)
    modes, settings = (GPU_MODES, GPU_SETTINGS) if gpu else (MODES, SETTINGS)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting, (options, batch, budgets) in settings.items():
            if quick:
                budgets = {mode: (2 * log_every, log_every) for mode, (_, log_every) in budgets.items()}
            rows += _setting(Path(tmp) / f"s{len(rows)}", setting, options, batch, budgets, peaks, modes, on_row)
    native = torch.cuda.is_bf16_supported() if gpu else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return {"rows": rows, "peaks": peaks, "threads": threads, "native_bf16": native,
            "device": torch.cuda.get_device_name() if gpu else "cpu"}


def _setting(run_dir: Path, setting: str, options: dict, batch: int, budgets: dict[str, tuple[int, int]],
             peaks: dict[str, float], modes: dict[str, tuple[str, bool]] = MODES,
             on_row: Any = None) -> list[dict[str, Any]]:
    plan = compile_options(ConvertOptions(teacher_training="end-to-end", precision="fp32", **options))
    for job in plan.jobs:
        if "train" in job.config:
            job.config["train"].update(steps=1, batch_size=batch, warmup_steps=0, log_every=1)
    plan.rehash()
    quiet = Console(stderr=True, quiet=True)
    prepare_run_dir(plan, run_dir)
    execute(plan, run_dir, only=["teacher", "meta"], console=quiet)
    flops = step_flops(plan, run_dir)
    rows = []
    for name in JOBS:
        for mode, (precision, compiled) in modes.items():
            steps, log_every = budgets[mode]
            job = plan.job(name)
            job.config["train"].update(steps=steps, log_every=log_every, precision=precision, compile=compiled)
            plan.rehash()
            plan.save(run_dir)
            shutil.rmtree(run_dir / "jobs" / job.dir, ignore_errors=True)
            torch._dynamo.reset()
            execute(plan, run_dir, only=[name], console=quiet)
            row = _measured(run_dir / "jobs" / job.dir, batch, log_every)
            achieved = flops[name] * row["steady_samples_per_s"]
            row.update(setting=setting, job=job.kind, mode=mode, batch=batch, steps=steps,
                       gflop_per_sample=round(flops[name] / 1e9, 3), achieved_gflops=round(achieved / 1e9, 2),
                       fraction_of_peak=round(achieved / peaks[precision], 3))
            rows.append(row)
            if on_row is not None:
                on_row(row)
            print(f"  {setting} {job.kind} {mode}: {row['steady_samples_per_s']} samples/s steady, "
                  f"{row['train_seconds']} s in all, {row['achieved_gflops']} GFLOP/s "
                  f"({100 * row['fraction_of_peak']:.1f} % of the {precision} peak)", flush=True)
    return rows


def _measured(job_dir: Path, batch: int, log_every: int) -> dict[str, Any]:
    lines = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((job_dir / "result.json").read_text())
    steady = lines[1:] or lines
    seconds = sum(log_every * batch / line["samples_per_second"] for line in steady)
    return {"steady_samples_per_s": round(len(steady) * log_every * batch / seconds, 2),
            "first_window_s": round(lines[0]["seconds"], 2), "train_seconds": round(result["seconds"], 2),
            "final_loss": round(result["final_loss"], 4)}


def step_flops(plan: Any, run_dir: Path) -> dict[str, float]:
    """FLOPs per trained sample of ``m2mkd:i`` and ``baseline`` (see the module docstring)."""
    from monomod.runtime.jobs import RunContext
    from monomod.students.summary import stage_costs

    ctx = RunContext(run_dir=run_dir, plan=plan)
    teacher = [spec.flops for spec in ctx.partition().modules]
    meta = [c.flops for c in stage_costs(ctx.new_meta())]
    student = [c.flops for c in stage_costs(ctx.new_student(0))]
    flops = {"baseline": 3.0 * sum(student)}
    for name in JOBS:
        if name.startswith("m2mkd:"):
            i = int(name.split(":")[1])
            flops[name] = sum(meta[:i]) + teacher[i] + 3.0 * sum(meta[i + 1:]) + 3.0 * student[i]
    return flops


def matmul_peak(dtype: str, quick: bool = False, device: str = "cpu") -> float:
    """Best ``torch.mm`` FLOP/s over a few square sizes, in fp32 or bf16, at this process's thread count (CPU) or on
    the GPU (fp32 as PyTorch runs it by default: full fp32, no TF32)."""
    best = 0.0
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for n in ((2048, 4096, 8192) if device == "cuda" else (256, 512, 1024)):
        a = torch.randn(n, n, dtype=torch.float32 if dtype == "fp32" else torch.bfloat16, device=device)
        b = torch.randn_like(a)
        torch.mm(a, b)
        sync()
        repeats, started = 0, time.perf_counter()
        while repeats < 3 or time.perf_counter() - started < (0.3 if quick else 1.0):
            torch.mm(a, b)
            repeats += 1
            sync()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - started))
    return best


def markdown(result: dict[str, Any]) -> str:
    peaks = result["peaks"]
    where = f"{result['device']}, " if result.get("device", "cpu") != "cpu" else ""
    lines = [f"{where}{result['threads']} threads; measured `torch.mm` peaks: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, "
             f"bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s (native bf16: {'yes' if result['native_bf16'] else 'no'}). "
             "Steady samples/s leave out the first logging window (warm-up and compile); train s includes it. "
             "Under bf16 autocast only matmul-like ops run in bf16 (norms, softmax and the loss stay fp32), so a bf16 "
             "job's FLOP/s can pass the bf16 `torch.mm` peak where bf16 is emulated.", "",
             "| setting | job | mode | batch | steps | steady samples/s | vs fp32 | train s | first window s | "
             "GFLOP/sample | GFLOP/s | of fp32 peak | of bf16 peak |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {(r["setting"], r["job"]): r["steady_samples_per_s"] for r in result["rows"] if r["mode"] == "fp32"}
    for r in result["rows"]:
        ratio = r["steady_samples_per_s"] / base[(r["setting"], r["job"])]
        lines.append(f"| {r['setting']} | {r['job']} | {r['mode']} | {r['batch']} | {r['steps']} | "
                     f"{r['steady_samples_per_s']} | {ratio:.2f}x | {r['train_seconds']} | {r['first_window_s']} | "
                     f"{r['gflop_per_sample']} | {r['achieved_gflops']} | "
                     f"{100 * r['achieved_gflops'] * 1e9 / peaks['fp32']:.1f} % | "
                     f"{'%.0f %%' % (100 * r['achieved_gflops'] * 1e9 / peaks['bf16']) if r['mode'].startswith('bf16') else '-'} |")
    lines += ["", "Compile pays for itself after (its extra first-window time) / (the time it saves per step) steps: "
              + "; ".join(f"{r['setting']} {r['job']}: {_break_even(r, result['rows'])}"
                          for r in result["rows"] if r["mode"].endswith("+compile")) + "."]
    return "\n".join(lines) + "\n"


def _break_even(compiled: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    eager_mode = compiled["mode"].removesuffix("+compile")
    eager = next(r for r in rows if r["mode"] == eager_mode and (r["setting"], r["job"]) == (compiled["setting"],
                                                                                             compiled["job"]))
    per_step = lambda r: r["batch"] / r["steady_samples_per_s"]  # noqa: E731
    saved = per_step(eager) - per_step(compiled)
    if saved <= 0:
        return "never"
    return f"{(compiled['first_window_s'] - eager['first_window_s']) / saved:.0f} steps"


# ------------------------------------------------------------------------------------ input path and the anchor
# Issue 26: samples/s of the two input paths (the CPU path's per-image augmentation against the device path's
# batched one) and of a plain timm training loop on the same batches, the anchor an m2mKD phase is read against
# (the phase's own samples/s, separate against fused, come from benchmarks/fused.py).


def input_rows(batches: int = 10, repeats: int = 3, batch: int = 64) -> list[dict[str, Any]]:
    """Median images/s over ``repeats`` interleaved rounds of ``batches`` demo batches (digits, 32 px, the demo's
    augmentation), per input path, and samples/s of a plain timm loop (``vit_tiny`` at 32 px, AdamW, cross-entropy)
    fed by the CPU path. On a CUDA machine the device path runs on the GPU, elsewhere on CPU tensors."""
    import statistics

    import timm

    from monomod.data import load_data, make_loader
    from monomod.runtime.device_data import device_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train = load_data("digits", img_size=32, in_chans=3).train
    cpu = lambda: make_loader(train, batch_size=batch, shuffle=True, seed=0, epoch=0, drop_last=True)  # noqa: E731
    on_device = device_loader(train, batch, shuffle=True, seed=0, device=device)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, num_classes=10, in_chans=3).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def timm_loop(x: torch.Tensor, y: torch.Tensor) -> None:
        loss = torch.nn.functional.cross_entropy(model(x.to(device)), y.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ways = {"input: cpu path (per image, main process)": (cpu, None),
            f"input: device path (batched, {device.type} tensors)": (lambda: on_device(0), None),
            "anchor: plain timm loop (vit_tiny, cpu input path)": (cpu, timm_loop)}
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, (loader, step) in ways.items():
            started, seen = time.perf_counter(), 0
            for n, (x, y) in enumerate(loader()):
                if n == batches:
                    break
                if step is not None:
                    step(x, y)
                seen += len(y)
            sync()
            seconds[name].append((time.perf_counter() - started) / seen)
    return [{"what": name, "device": device.type, "batch": batch, "batches": batches,
             "samples_per_s": round(1 / statistics.median(s), 1)} for name, s in seconds.items()]


def folder_rows(per_class: int = 100, batches: int = 6, repeats: int = 3, batch: int = 64,
                workers: int | None = None) -> list[dict[str, Any]]:
    """Median images/s over ``repeats`` interleaved rounds of ``batches`` batches of an ImageFolder of 256x320 JPEGs
    at 224 px, under the light augmentation (timm's random resized crop and flip) and the paper's (also RandAugment
    ``rand-m9-mstd0.5-inc1`` and random erasing 0.25): the CPU path (decoded and augmented image by image in the
    loader's workers) against the device path (workers read bytes; decoded, cropped, RandAugmented and erased on the
    device: nvJPEG on CUDA, the CPU elsewhere) and the cached path (``--input-path cached``: decoded once into a
    pre-resized copy on the device, whose building is not timed)."""
    import statistics

    from benchmarks.data import write_folder
    from monomod.data import Augment, default_workers, load_data, make_loader
    from monomod.rundir import RunDir
    from monomod.runtime.device_folder import folder_loader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    augments = {"light": Augment(), "paper": Augment(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25)}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_folder(Path(tmp), per_class)
        (root / "val").symlink_to(root / "train")  # monomod's image folders need a val/ split
        bundle = load_data(f"imagefolder:{root}", img_size=224, in_chans=3, ood=None)
        ways = {}
        for name, augment in augments.items():
            train = bundle.train_with(augment)
            n = default_workers(train) if workers is None else workers
            cpu = make_loader(train, batch_size=batch, shuffle=True, seed=0, epoch=0, drop_last=True, num_workers=n)
            on_device = folder_loader(train, bundle, augment, batch, shuffle=True, seed=0, device=device, workers=n)
            ways[f"ImageFolder 224 px, {name}: cpu path ({n} workers decode and augment)"] = lambda cpu=cpu: cpu
            ways[f"ImageFolder 224 px, {name}: device path ({n} workers read, {device.type} decodes and augments)"] = (
                lambda make=on_device: make(0))
            ways[f"ImageFolder 224 px, {name}: anchor, timm's create_loader + prefetcher ({n} workers)"] = (
                lambda augment=augment, n=n: _timm_loader(root / "train", augment, batch, n, device))
            cached = folder_loader(train, bundle, augment, batch, shuffle=True, seed=0, device=device, workers=n,
                                   cache_at=RunDir(Path(tmp) / "run").image_cache)  # built here, once: not timed
            ways[f"ImageFolder 224 px, {name}: cached path (pre-resized copy on the {device.type}, augmented there)"] = (
                lambda make=cached: make(0))
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(repeats):
            for name, loader in ways.items():
                started, seen = time.perf_counter(), 0
                for k, (x, y) in enumerate(loader()):
                    if k == batches:
                        break
                    seen += len(y)
                sync()
                seconds[name].append((time.perf_counter() - started) / seen)
    return [{"what": name, "device": device.type, "batch": batch, "batches": batches,
             "samples_per_s": round(1 / statistics.median(s), 1)} for name, s in seconds.items()]


def _timm_loader(root: Path, augment: Any, batch: int, workers: int, device: torch.device) -> Any:
    """timm's own training input pipeline on the same folder and augmentation: ``create_loader`` with its
    prefetcher (normalisation and erasing on ``device``), the loop a timm training script runs."""
    from timm.data import create_dataset, create_loader

    from monomod.data import cap_rand_augment

    loader = create_loader(create_dataset("", root=str(root), is_training=True), input_size=(3, 224, 224),
                           batch_size=batch, is_training=True, re_prob=augment.reprob, re_mode="pixel",
                           auto_augment=augment.auto_augment, num_workers=workers, use_prefetcher=True,
                           device=device, persistent_workers=False)
    cap_rand_augment(loader.loader.dataset.transform)  # the Pillow 13 fix monomod applies
    return loader


def input_markdown(result: dict[str, Any]) -> str:
    lines = [("Measured under load: other engineers' jobs shared the 2 cores. " if result.get("loaded") else "")
             + "On a GPU machine, run the same command there: the device path then runs on CUDA (to be measured). "
             "On a CPU the device path for image folders is the slower one: it decodes in the main process rather "
             "than in the loader's workers, and hashes erasing's noise (per erased pixel); it is built for CUDA (nvJPEG "
             "decodes the whole batch), and `--input-path auto` keeps image folders on the CPU path until it is "
             "measured there. The cached path (`--input-path cached`) skips reading and decoding: its rows leave "
             "out the one-time build of the pre-resized copy.",
             "", "| what | device | batch | samples/s (median of interleaved rounds) |", "|---|---|---:|---:|"]
    lines += [f"| {r['what']} | {r['device']} | {r['batch']} | {r['samples_per_s']} |" for r in result["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python -m benchmarks.throughput --input [--loaded]: the input-path rows alone
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--input", action="store_true",
                        help="measure the input paths (digits, and an ImageFolder at 224 px) and the timm anchor")
    parser.add_argument("--loaded", action="store_true", help="say in the table that the machine was shared")
    args = parser.parse_args()
    if args.input:
        from benchmarks.run import machine, save_collected

        started = time.perf_counter()
        result = {"rows": input_rows() + folder_rows(), "loaded": args.loaded}
        result["meta"] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                          "seconds": round(time.perf_counter() - started, 1),
                          "command": "python -m benchmarks.throughput --input" + (" --loaded" if args.loaded else "")}
        save_collected("throughput_input", result, input_markdown(result))
        print(input_markdown(result))
