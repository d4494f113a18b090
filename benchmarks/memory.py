"""Peak memory and step time of one m2mKD job against whole-model knowledge distillation.

Each measurement runs in a fresh process (so peaks do not leak between them) and reports the peak resident set
size (``ru_maxrss``) of the whole process, plus the RSS before the model work starts, so the framework's own
footprint can be subtracted:

* ``m2mkd``: what an m2mKD job holds: the meta model, teacher module i (only its weights, read from a file) and
  student stage i with its stitches, training for a few steps (i = a middle module);
* ``kd``: whole-model KD: the full teacher and the full student resident, the student trained against the
  teacher's logits for the same number of steps.

Step time is the median over the steps after the first (one thread each, batch 8, 224 px).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(mode: str, teacher_name: str, path: str, k: int, steps: int, img_size: int, batch: int, queue: Any) -> None:
    import torch

    import monomod
    from monomod.runtime.losses import m2mkd_loss

    torch.manual_seed(0)
    torch.set_num_threads(1)
    base = _rss_mib()
    step_times: list[float] = []
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    student = monomod.build_student("vit", modules=k, num_classes=10, img_size=img_size, preset="small", patch_size=16)
    if mode == "kd":
        teacher = monomod.load_model(teacher_name, img_size=img_size, num_classes=10, weights=path).eval()
        trainable: torch.nn.Module = student

        def logits() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                target = teacher(x)
            return student(x), target
    else:
        from safetensors import safe_open

        meta_model = monomod.load_model(teacher_name, img_size=img_size, num_classes=10, device="meta")
        part = monomod.partition(monomod.trace(meta_model, torch.zeros(1, 3, img_size, img_size, device="meta")), k)
        i = k // 2
        module = monomod.extract(part)[i].to_empty(device="cpu")
        with safe_open(path, framework="pt") as f:  # only module i's weights, as an m2mKD job reads them
            module.load_state_dict({key: f.get_tensor(key) for key in module.state_dict()})
        meta = monomod.build_meta(part).eval()
        width = part.modules[i].outputs[0].shape[-1]
        trainable = monomod.stitch(student.stages[i], width, width)
        del student
        prefix, suffix = torch.nn.Sequential(*meta.stages[:i]), torch.nn.Sequential(*meta.stages[i + 1:])

        def logits() -> tuple[torch.Tensor, torch.Tensor]:
            with torch.no_grad():
                context = prefix(x)
                target = suffix(module(context))
            return suffix(trainable(context)), target

    optimizer = torch.optim.AdamW(trainable.parameters())
    for _ in range(steps):
        started = time.perf_counter()
        loss = m2mkd_loss(*logits(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"mode": mode, "teacher": teacher_name, "base_mib": round(base, 1),
               "peak_mib": round(peak, 1), "peak_over_base_mib": round(peak - base, 1),
               "step_s": round(statistics.median(step_times[1:]), 4)})


def _save_teacher(teacher: str, path: str, img_size: int) -> None:
    from safetensors.torch import save_file

    import monomod

    save_file(monomod.load_model(teacher, img_size=img_size, num_classes=10).state_dict(), path)


def measure(mode: str, teacher: str, path: str, k: int = 4, steps: int = 6, img_size: int = 224, batch: int = 8) -> dict[str, Any]:
    """One measurement in a fresh process; the teacher's weights come from ``path``, as in a run."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(mode, teacher, path, k, steps, img_size, batch, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def run(quick: bool = False) -> dict[str, Any]:
    teachers = ["vit_small_patch16_224"] if quick else ["vit_small_patch16_224", "vit_base_patch16_224"]
    rows = []
    for teacher in teachers:
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "teacher.safetensors")
            saver = mp.get_context("spawn").Process(target=_save_teacher, args=(teacher, path, 224))
            saver.start()
            saver.join()
            m2mkd, kd = measure("m2mkd", teacher, path), measure("kd", teacher, path)
        rows.append({"teacher": teacher, "m2mkd": m2mkd, "kd": kd,
                     "ratio_over_base": round(kd["peak_over_base_mib"] / max(m2mkd["peak_over_base_mib"], 1e-9), 2),
                     "step_ratio": round(kd["step_s"] / m2mkd["step_s"], 2)})
        print(f"  {teacher}: m2mKD {m2mkd['peak_over_base_mib']} MiB {m2mkd['step_s']} s/step, "
              f"KD {kd['peak_over_base_mib']} MiB {kd['step_s']} s/step", flush=True)
    return {"rows": rows, "k": 4, "steps": 6, "img_size": 224, "batch": 8}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| teacher | m2mKD job peak RSS (MiB) | whole-model KD peak RSS (MiB) | above framework: m2mKD | KD | "
             "KD / m2mKD | m2mKD step (s) | KD step (s) | KD / m2mKD |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['teacher']} | {r['m2mkd']['peak_mib']} | {r['kd']['peak_mib']} | "
                     f"{r['m2mkd']['peak_over_base_mib']} | {r['kd']['peak_over_base_mib']} | {r['ratio_over_base']} | "
                     f"{r['m2mkd']['step_s']} | {r['kd']['step_s']} | {r['step_ratio']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
