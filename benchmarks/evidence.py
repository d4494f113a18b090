"""Evidence of the method on digits: m2mKD + fine-tune against the same student trained from scratch.

One demo teacher (``vit_tiny`` adapted to digits with the demo budget, seed 0) serves every run, as a pretrained
teacher would. For the NAC and the MoE student (K=4, demo budgets, nothing tuned) and seeds 0, 1, 2:

- ``m2mKD``: trained meta model, logits-only loss (the paper's setting), then fine-tune;
- ablations: the teacher's own modules as the meta model; for MoE, a boundary feature loss (MSE, weight 1.0,
  fixed a priori; a NAC's boundaries carry latents, not the teacher's tokens, so it has none) and experts upcycled
  from the teacher's MLPs (the scratch baseline is then upcycled too);
- ``scratch, equal epochs``: the plan's baseline job, the fine-tune budget from a random init;
- ``scratch, equal compute``: from a random init for as many steps as fit in the m2mKD pipeline's measured time
  (meta model + the K m2mKD jobs + fine-tune, run one after another on this machine). The teacher is not counted:
  it is the given pretrained model in the paper's setting (its adaptation time is reported alongside).

Every number is accuracy on the digits val split (IID) and its corrupted copy (OOD), read once at the end of
training; no run, checkpoint or setting is picked by its val score. Runs live in ``benchmarks/runs/evidence`` and
are resumable: jobs finished with the same hash are reused (``monomod convert --reuse``), so an interrupted study
picks up where it stopped and shared jobs (teacher, meta model, baselines) run once.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from monomod.compiler import ConvertOptions
from monomod.api import load_run
from monomod.compiler import compile_options
from monomod.runtime.execute import execute, prepare_run_dir, reuse_finished
from monomod.runtime.jobs import RunContext
from monomod.runtime.train import evaluate

HERE = Path(__file__).parent
SEEDS = (0, 1, 2)
FEATURE_LOSS = 1.0
TEACHER_WIDTH = {"embed_dim": 192, "num_heads": 3}  # vit_tiny's: upcycling needs experts of the teacher's shapes
SCRATCH = "scratch, equal epochs"
EQUAL_COMPUTE = "scratch, equal compute"
# (variant, student families, ConvertOptions overrides, the scratch baseline it is compared with)
VARIANTS: list[tuple[str, tuple[str, ...], dict[str, Any], str]] = [
    ("m2mKD", ("nac", "moe"), {}, SCRATCH),
    ("m2mKD, teacher as meta", ("nac", "moe"), {"meta": "teacher"}, SCRATCH),
    ("m2mKD + feature loss", ("moe",), {"feature_loss": FEATURE_LOSS}, SCRATCH),  # NAC latents are not teacher tokens
    ("m2mKD, teacher width", ("moe",), {"student_overrides": TEACHER_WIDTH}, "scratch, teacher width"),
    ("m2mKD, teacher width, upcycled", ("moe",), {"student_overrides": TEACHER_WIDTH, "upcycle": True},
     "scratch, teacher width, upcycled"),
]
QUICK_STEPS = {"teacher": 40, "meta": 20, "m2mkd": 10, "finetune": 30}


def run(quick: bool = False) -> dict[str, Any]:
    root = HERE / "runs" / ("evidence-quick" if quick else "evidence")
    seeds = SEEDS[:1] if quick else SEEDS
    budgets = {kind: {"steps": steps} for kind, steps in QUICK_STEPS.items()} if quick else {}
    quiet = Console(stderr=True, quiet=True)
    finished: list[Path] = []

    def convert(name: str, only: list[str] | None = None, **options: Any) -> Path:
        options.setdefault("budgets", budgets)
        plan = compile_options(ConvertOptions(teacher="vit_tiny", modules=4, **options))
        run_dir = prepare_run_dir(plan, root / name, force=True)
        reuse_finished(plan, run_dir, finished)
        started = time.perf_counter()
        execute(plan, run_dir, only=only, console=quiet)
        print(f"  {name}: {time.perf_counter() - started:.0f} s", flush=True)
        finished.append(run_dir)
        return run_dir

    teacher_dir = convert("teacher", only=["teacher"], student="nac")
    weights = str((teacher_dir / "jobs/teacher/model.safetensors").resolve())
    given = {"weights": weights, "teacher_trained": True}
    teacher_seconds = _job_seconds(teacher_dir, "teacher")
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        for student in ("nac", "moe"):
            for variant, families, overrides, scratch in VARIANTS:
                if student not in families:
                    continue
                slug = variant.replace(" ", "").replace(",", "-").replace("+", "-")
                run_dir = convert(f"{student}-{slug}-s{seed}", student=student, seed=seed, **given, **overrides)
                report = load_run(run_dir).report
                seconds = {name: info["seconds"] for name, info in report["jobs"].items()}
                m2mkd = sum(s for name, s in seconds.items() if name.startswith("m2mkd:"))
                pipeline_seconds = round(seconds.get("meta", 0.0) + m2mkd + seconds["finetune"], 1)
                rows.append({"student": student, "variant": variant, "seed": seed, **_accuracies(report["student"]),
                             "assembled_iid": report["assembled"]["iid_acc"], "seconds": pipeline_seconds,
                             "compare": scratch})
                if not any(r["student"] == student and r["variant"] == scratch and r["seed"] == seed for r in rows):
                    rows.append({"student": student, "variant": scratch, "seed": seed,
                                 **_accuracies(report["baseline"]), "seconds": seconds["baseline"]})
                if overrides:
                    continue
                # Scratch at equal compute: the m2mKD pipeline's time at the baseline's measured step rate.
                steps = load_run(run_dir).plan.job("baseline").config["train"]["steps"]
                long_steps = round(pipeline_seconds / (seconds["baseline"] / steps))
                long_budgets = {**budgets, "finetune": {"steps": long_steps}}
                long_dir = convert(f"{student}-scratch-equalcompute-s{seed}", only=["baseline"], student=student,
                                   seed=seed, **given, budgets=long_budgets)
                rows.append({"student": student, "variant": EQUAL_COMPUTE, "seed": seed,
                             **_evaluate_baseline(long_dir), "steps": long_steps,
                             "seconds": _job_seconds(long_dir, "baseline")})
    return {"seeds": list(seeds), "rows": rows, "teacher_seconds": teacher_seconds, "feature_loss": FEATURE_LOSS,
            "teacher": _teacher_accuracy(finished), "summary": summarise(rows),
            "budgets": "quick: " + str(QUICK_STEPS) if quick else "demo preset"}


def _job_seconds(run_dir: Path, job: str) -> float:
    return json.loads((run_dir / "jobs" / job / "done.json").read_text())["seconds"]


def _accuracies(result: dict[str, float | None]) -> dict[str, float | None]:
    return {"iid": result["iid_acc"], "ood": result["ood_acc"]}


def _evaluate_baseline(run_dir: Path) -> dict[str, float | None]:
    """IID/OOD accuracy of a run's baseline product, evaluated exactly as the evaluate job does."""
    plan = load_run(run_dir).plan
    ctx = RunContext(run_dir=run_dir, plan=plan)
    model = ctx.new_student(plan.settings["seed"])
    model.load_state_dict(ctx.product("baseline"))
    iid = evaluate(model, ctx.loader("val", 256, shuffle=False)(0))
    ood = evaluate(model, ctx.loader("ood", 256, shuffle=False)(0)) if ctx.data.ood is not None else None
    return {"iid": iid, "ood": ood}


def _teacher_accuracy(runs: list[Path]) -> dict[str, float | None]:
    report = next(r for r in (load_run(d).report for d in runs) if r)
    return _accuracies(report["teacher"])


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (student, variant), and the paired gain of each m2mKD variant over scratch."""
    out = []
    for student in dict.fromkeys(r["student"] for r in rows):
        for variant in dict.fromkeys(r["variant"] for r in rows if r["student"] == student):
            group = [r for r in rows if r["student"] == student and r["variant"] == variant]
            entry: dict[str, Any] = {"student": student, "variant": variant, "n": len(group),
                                     "seconds": statistics.median(r["seconds"] for r in group)}
            for metric in ("iid", "ood"):
                entry[metric] = _mean_std([r[metric] for r in group])
                if variant.startswith("m2mKD"):
                    baselines = [group[0]["compare"]] + ([EQUAL_COMPUTE] if variant == "m2mKD" else [])
                    for base in baselines:
                        by_seed = {r["seed"]: r[metric] for r in rows if r["student"] == student and r["variant"] == base}
                        diffs = [r[metric] - by_seed[r["seed"]] for r in group if r["seed"] in by_seed]
                        entry.setdefault("gain", {}).setdefault(base, {})[metric] = _mean_std(diffs)
            out.append(entry)
    return out


def _mean_std(values: list[float | None]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def _pct(stat: dict[str, float] | None, signed: bool = False) -> str:
    if stat is None:
        return "-"
    sign = "+" if signed else ""
    return f"{100 * stat['mean']:{sign}.1f} ± {100 * stat['std']:.1f}"


def markdown(result: dict[str, Any]) -> str:
    teacher = result["teacher"]
    lines = [f"Digits (val = IID, corrupted val = OOD), `vit_tiny` demo teacher ({100 * teacher['iid']:.1f} / "
             f"{100 * teacher['ood']:.1f} %, adapted in {result['teacher_seconds']:.0f} s, not counted below), K=4, "
             f"{result['budgets']} budgets, seeds {result['seeds']}. Accuracy in %, mean ± std over seeds; compute is "
             "the median seconds of training a variant needs (m2mKD: meta model + K m2mKD jobs + fine-tune).", ""]
    for student in dict.fromkeys(e["student"] for e in result["summary"]):
        lines += [f"**{student.upper()} student**", "",
                  "| variant | IID | OOD | compute (s) | gain IID vs scratch (equal epochs / equal compute) | gain OOD |",
                  "|---|---:|---:|---:|---|---|"]
        for e in (e for e in result["summary"] if e["student"] == student):
            gains = {m: " / ".join(_pct(g[m], signed=True) for g in e["gain"].values()) for m in ("iid", "ood")} if "gain" in e else {"iid": "", "ood": ""}
            lines.append(f"| {e['variant']} | {_pct(e['iid'])} | {_pct(e['ood'])} | {e['seconds']:.0f} | "
                         f"{gains['iid']} | {gains['ood']} |")
        lines.append("")
    lines += ["Per seed (IID / OOD %):", "", "| student | variant | " + " | ".join(f"seed {s}" for s in result["seeds"]) + " |",
              "|---|---|" + "---:|" * len(result["seeds"])]
    for student, variant in dict.fromkeys((r["student"], r["variant"]) for r in result["rows"]):
        by_seed = {r["seed"]: r for r in result["rows"] if r["student"] == student and r["variant"] == variant}
        cells = [f"{100 * by_seed[s]['iid']:.1f} / {100 * by_seed[s]['ood']:.1f}" if s in by_seed else "-" for s in result["seeds"]]
        lines.append(f"| {student} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
