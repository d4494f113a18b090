"""Tables of the demo matrix run by ``experiments/device_demo.sh`` on a GPU machine.

``OUT=DIR bash experiments/device_demo.sh`` (on the GPU machine) writes ``DIR/results.jsonl`` and ``DIR/data.json``;
``python -m experiments.device_demo DIR [NOTE]`` (anywhere) turns them into ``experiments/results/device_demo.{json,md}``
and rebuilds ``experiments/RESULTS.md``. One seed per variant: read differences of a few points as noise.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from experiments import HERE, machine_of


def _pct(cell: dict[str, Any] | None, key: str) -> str:
    value = (cell or {}).get(key)
    return "-" if value is None else f"{100 * value:.1f}"


def _hybrids(run: dict[str, Any], key: str) -> str:
    return " / ".join(_pct(m, key) for m in run.get("modules") or [])


def markdown(result: dict[str, Any]) -> str:
    lines = ["All runs: `monomod convert vit_tiny --modules 4 --preset demo` on digits (one seed), the variant's options "
             "below; runs after the first two reuse their teacher-side jobs (`--reuse`). IID / OOD top-1 in %; "
             "hybrids are modules 0 / 1 / 2 / 3 on val.", *([result["note"]] if result.get("note") else []), "",
             "| run | options | teacher | m2mKD student | baseline | assembled | teacher hybrids | student hybrids | "
             "warnings | wall (s) |", "|---|---|---:|---:|---:|---:|---|---|---:|---:|"]
    for run in result["runs"]:
        cells = [f"{_pct(run.get(k), 'iid_acc')} / {_pct(run.get(k), 'ood_acc')}"
                 for k in ("teacher", "student", "baseline", "assembled")]
        options = run["args"].split(" --reuse")[0]
        lines.append(f"| {run['name']} | `{options}` | " + " | ".join(cells) + f" | {_hybrids(run, 'teacher_hybrid_acc')} | "
                     f"{_hybrids(run, 'student_hybrid_acc')} | {len(run.get('warnings') or [])} | {run['seconds']} |")
    data = result.get("data")
    if data:
        lines += ["", "The data benchmark on the same machine's CPU (`python -m benchmarks.run --only data`, "
                  f"{data['images']} JPEGs, batch {data['batch_size']}, {data['img_size']} px):", "",
                  "| loader workers | monomod (img/s) | timm (img/s) | monomod / timm | monomod vs 0 workers |",
                  "|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['workers']} | {r['monomod']} | {r['timm']} | {r['monomod_vs_timm']} | {r['monomod_vs_0_workers']} |"
                  for r in data["rows"]]
    loader = result.get("loader")
    if loader:
        lines += ["", f"One `paper`-preset m2mKD job on the GPU (`bash experiments/device_loader.sh`: vit_small -> vit, "
                  f"module 0, {loader['steps']} steps of {loader['batch_size']} real 256x320 JPEGs at 224 px with "
                  "RandAugment, random erasing, mixup/CutMix), loader workers off and on; GPU utilisation sampled "
                  "every 200 ms by nvidia-smi over the whole command:", "",
                  "| loader workers | images/s | job (s) | GPU utilisation mean (%) |", "|---:|---:|---:|---:|"]
        lines += [f"| {r['loader_workers']} | {r['images_per_second']} | {r['job_seconds']} | {r['gpu_util_mean']} |"
                  for r in loader["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    source = Path(argv[0]) if argv else HERE / "results"
    runs = [json.loads(line) for line in (source / "results.jsonl").read_text().splitlines() if line.strip()]
    data_path, loader_path = source / "data.json", source / "loader.json"
    note = argv[1] if len(argv) > 1 else None  # e.g. the budgets the runs had, when the preset has changed since
    result = {"runs": runs, "note": note, "data": json.loads(data_path.read_text()) if data_path.is_file() else None,
              "loader": json.loads(loader_path.read_text()) if loader_path.is_file() else None,
              "meta": {"machine": machine_of(source, "device_demo"), "date": time.strftime("%Y-%m-%d"), "seconds": max(r["seconds"] for r in runs),
                       "command": "OUT=DIR bash experiments/device_demo.sh; python -m experiments.device_demo DIR"}}
    from benchmarks.run import save_collected

    save_collected("device_demo", result, markdown(result), package="experiments")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
