"""Run monomod's benchmarks: ``python -m benchmarks.run [--quick] [--only partition,memory]``.

Each benchmark writes ``benchmarks/results/<name>.json`` and ``.md``; ``benchmarks/RESULTS.md`` collects the
Markdown tables with the machine they ran on and the command that produced them. ``--quick`` is a fast sanity pass
(fewer models, fewer repeats) whose numbers go to ``benchmarks/results/quick/`` and never into RESULTS.md.
The research studies and one-off device runs live in ``experiments/`` and write their results the same way
(``package="experiments"``: ``experiments/results/`` and ``experiments/RESULTS.md``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
BENCHMARKS = {
    "partition": "Partition quality and speed against greedy-by-parameters and uniform-by-blocks splits",
    "partition_families": "Partition balance at K=8 across timm: the smallest model of each family timm's fx test covers",
    "memory": "Peak memory and step time: one m2mKD job against whole-model KD",
    "scaling": "The K m2mKD jobs of the demo plan on 1 and 2 workers",
    "onnx_latency": "Per-stage latency: onnxruntime against torch eager on the CPU",
    "data": "Training-loader images/s on real JPEGs: monomod against timm's create_loader, 0/1/2 workers",
    "throughput": "Training samples/s of an m2mKD and a fine-tune job: fp32 eager against bf16 and torch.compile",
    "explorer": "The partition explorer page: size and first render in headless Chromium, a big graph fully expanded",
    "fused": "The demo's m2mKD phase as one fused job against K separate jobs (3 seeds, hybrid accuracies)",
    "phase": "The m2mKD phase, separate against fused, against the matmul peaks and a plain timm loop",
    "augment": "Batched augmentation on the device: monomod's own ops against kornia and torchvision v2",
}


# Collected into RESULTS.md but not run by this script (one-off runs: see each module's docstring).
COLLECTED = {
    "fused_demo": "The demo's m2mKD phase fused against separate at the demo's full budget (250 steps per job)",
    "throughput_input": "Input paths (per image on the CPU, batched on the device) and a plain timm loop as the anchor",
}


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fast sanity pass of every benchmark")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(BENCHMARKS)}")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"== {name}: {BENCHMARKS[name]}", flush=True)
        started = time.perf_counter()
        result = module.run(quick=args.quick)
        command = f"python -m benchmarks.run --only {name}" + (" --quick" if args.quick else "")
        write_result(name, result, started, quick=args.quick, command=command, collect_all=False)
    if not args.quick:
        collect()
    return 0


def _home(package: str) -> tuple[Path, dict[str, str]]:
    """The folder of ``package`` (benchmarks or experiments) and the titles of what its RESULTS.md collects."""
    if package == "benchmarks":
        return HERE, {**BENCHMARKS, **COLLECTED}
    module = importlib.import_module(package)
    return module.HERE, module.TITLES


def write_result(name: str, result: dict, started: float, *, quick: bool, command: str,
                 collect_all: bool = True, package: str = "benchmarks") -> None:
    """``results/<name>.json`` and ``.md`` with the machine, date, time taken and command; then RESULTS.md."""
    module = importlib.import_module(f"{package}.{name}")
    home, _ = _home(package)
    out = home / "results" / ("quick" if quick else "")
    out.mkdir(parents=True, exist_ok=True)
    result["meta"] = {"machine": machine(), "seconds": round(time.perf_counter() - started, 1), "command": command,
                      "date": time.strftime("%Y-%m-%d")}
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(module.markdown(result))
    print(module.markdown(result), flush=True)
    if collect_all and not quick:
        collect(package)


def save_collected(name: str, result: dict, markdown_text: str, package: str = "benchmarks") -> None:
    """Write a collected result's ``results/<name>.json`` and ``.md`` (made on another machine), then RESULTS.md."""
    out = _home(package)[0] / "results"
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown_text)
    collect(package)


def collect(package: str = "benchmarks") -> None:
    """Rebuild ``package``'s RESULTS.md from the full (non-quick) results on disk."""
    home, titles = _home(package)
    heading = "# Benchmark results" if package == "benchmarks" else "# Experiment results"
    sections = [heading, "",
                "Numbers from shared 2-core machines are noisy: timings are medians of repeats, and comparisons are "
                "ratios measured side by side in one run. Regenerate a table with the command under it.", ""]
    for name, title in titles.items():
        path = home / "results" / f"{name}.json"
        if not path.is_file():
            continue
        meta = json.loads(path.read_text())["meta"]
        sections += [f"## {title}", "", f"Machine: {meta['machine']}; {meta['date']}; took {meta['seconds']} s.",
                     f"Command: `{meta['command']}`", "", (home / "results" / f"{name}.md").read_text()]
    (home / "RESULTS.md").write_text("\n".join(sections))


if __name__ == "__main__":
    sys.exit(main())
