"""Evidence, third round: the NAC with the reference's read-in (issue 23), against the same NAC from scratch.

Settings, all fixed before the first run (nothing tuned on val or OOD, no run picked by its score): those of
``experiments/evidence.py``'s NAC lane, unchanged, with the NAC as it now is (the reference's read-in LayerScales,
ModFC init, latent scale, ConvNeXt tokenizer, image-only stage-0 tokens in m2mKD, per-sample link sampling):

- Teacher: ``vit_tiny`` by Deep Incubation (demo preset), teacher seed 0, trained once and shared under ``--reuse``.
- NAC student (``small`` preset), demo budgets (m2mKD 250 steps per module, fine-tune 800), seeds 0, 1, 2.
- Full data: m2mKD + fine-tune; scratch at equal epochs (the fine-tune's 800 steps); scratch at equal compute: the
  steps that the whole m2mKD pipeline's summed job seconds (meta + K incubations + K m2mKD + fine-tune) buy at the
  scratch run's own step rate.
- Few labels: m2mKD on the full train split, fine-tune and scratch on 5 and 20 images per class, 300 steps.
- Assembly: every row above assembles with ``--assemble dropped`` (the reference's way); ``m2mKD, bridged`` rows
  fine-tune the same distilled modules assembled with ``--assemble bridged`` (the m2mKD jobs are reused), at full
  data. Each m2mKD row also records the assembled student's IID accuracy before fine-tuning.
- Every job runs on 1 torch thread; one seed per process, two seeds side by side on the 2 cores.

``python -m experiments.evidence_nac teacher``, then ``python -m experiments.evidence_nac seed N`` for N = 0, 1, 2
(two at a time), then ``python -m experiments.evidence_nac collect``. Runs live in ``experiments/runs/evidence-nac``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from experiments import evidence as ev
from monomod.api import load_run
from monomod.io import atomic_write_json

NAME = "evidence-nac"
BRIDGED = f"{ev.M2MKD}, bridged"


def study(quick: bool = False) -> ev.Study:
    return ev.Study(quick, name=NAME)


def seed_rows(s: ev.Study, seed: int) -> list[dict[str, Any]]:
    """The NAC lane's runs of one seed (dropped assembly), then the bridged fine-tune of the same modules."""
    rows = ev.seed_rows(s, "nac", seed)
    full = load_run(s.root / f"nac-m2mkd-s{seed}").report
    rows[0]["assembled"] = full["assembled"]["iid_acc"]
    bridged = s.convert(f"nac-bridged-s{seed}", only=["finetune", "assemble"], student="nac", seed=seed,
                        assemble="bridged")
    result = ev._evaluate_product(bridged, "finetune")
    row = ev._row("nac", BRIDGED, seed, None, result, None, ev._compound(bridged, "finetune"))
    row["assembled"] = ev._evaluate_product(bridged, "assemble")["iid_acc"]
    return rows + [row]


def collect(s: ev.Study) -> dict[str, Any]:
    rows = [row for path in sorted(s.root.glob("rows-nac-s*.json")) for row in json.loads(path.read_text())]
    walls = {p.stem[len("wall-"):]: json.loads(p.read_text())["seconds"] for p in s.root.glob("wall-*.json")}
    assembled = {variant: ev._mean_std([r.get("assembled") for r in rows if r["variant"] == variant
                                        and r["shots"] is None]) for variant in (ev.M2MKD, BRIDGED)}
    return {"seeds": sorted({r["seed"] for r in rows}), "shots": list(ev.SHOTS), "wall": walls,
            "shot_steps": ev.SHOT_STEPS, "threads": ev.THREADS, "rows": rows, "teacher": ev.teacher_numbers(s),
            "summary": ev.summarise(rows), "assembled": assembled,
            "budgets": "quick: " + str(ev.QUICK_STEPS) if s.quick else "demo preset"}


def markdown(result: dict[str, Any]) -> str:
    lines = ["NAC student assembled before fine-tuning (full data, IID %, mean ± std over seeds): "
             + "; ".join(f"`{variant}` {ev._pct(stat)}" for variant, stat in result["assembled"].items()) + ".", ""]
    return "\n".join(lines) + ev.markdown(result)


def run(quick: bool = False) -> dict[str, Any]:
    """The whole round, one seed after another (``python -m benchmarks.run --only evidence_nac``)."""
    s = study(quick)
    ev.run_teacher(s)
    for seed in s.seeds:
        atomic_write_json(s.root / f"rows-nac-s{seed}.json", seed_rows(s, seed))
    return collect(s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("teacher", "seed", "collect"))
    parser.add_argument("seed", nargs="?", type=int, choices=ev.SEEDS)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    s, started = study(args.quick), time.perf_counter()
    if args.part == "teacher":
        ev.run_teacher(s)
    elif args.part == "seed":
        if args.seed is None:
            parser.error("seed needs its number: seed 0, seed 1 or seed 2")
        atomic_write_json(s.root / f"rows-nac-s{args.seed}.json", seed_rows(s, args.seed))
    if args.part != "collect":
        tag = args.part if args.seed is None else f"seed{args.seed}"
        atomic_write_json(s.root / f"wall-{tag}.json", {"seconds": round(time.perf_counter() - started, 1)})
        return 0
    from benchmarks.run import write_result

    result = collect(s)
    walls = result["wall"]  # the round's time: the teacher, then two seeds side by side, then the third
    started -= walls.get("teacher", 0.0) + max(walls.get("seed0", 0.0), walls.get("seed1", 0.0)) + walls.get("seed2", 0.0)
    write_result("evidence_nac", result, started, quick=args.quick, package="experiments", command=ev.parts_command(
        "evidence_nac", ["teacher;", "seed 0 &", "seed 1;", "seed 2;", "collect"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
