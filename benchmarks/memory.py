"""Peak memory of one m2mKD job against whole-model knowledge distillation.

Each measurement runs in a fresh process (so peaks do not leak between them) and reports the peak resident set
size (``ru_maxrss``) of the whole process, plus the RSS before the model work starts, so the framework's own
footprint can be subtracted:

* ``m2mkd``: what an m2mKD job holds: the meta model, teacher module i (only its weights, read from a file) and
  student stage i with its stitches, training for a few steps (i = a middle module);
* ``kd``: whole-model KD: the full teacher and the full student resident, the student trained against the
  teacher's logits for the same number of steps.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import tempfile
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
    x, y = torch.randn(batch, 3, img_size, img_size), torch.randint(0, 10, (batch,))
    if mode == "kd":
        teacher = monomod.load_model(teacher_name, img_size=img_size, num_classes=10, weights=path).eval()
        student = monomod.build_student("vit", modules=k, num_classes=10, img_size=img_size, preset="small",
                                        patch_size=16)
        optimizer = torch.optim.AdamW(student.parameters())
        for _ in range(steps):
            with torch.no_grad():
                zt = teacher(x)
            loss = m2mkd_loss(student(x), zt, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    else:
        from safetensors import safe_open

        meta_model = monomod.load_model(teacher_name, img_size=img_size, num_classes=10, device="meta")
        part = monomod.partition(monomod.trace(meta_model, torch.zeros(1, 3, img_size, img_size, device="meta")), k)
        i = k // 2
        module = monomod.extract(part)[i].to_empty(device="cpu")
        with safe_open(str(path), framework="pt") as f:
            module.load_state_dict({key: f.get_tensor(key) for key in module.state_dict()})
        meta = monomod.build_meta(part).eval()
        student = monomod.build_student("vit", modules=k, num_classes=10, img_size=img_size, preset="small", patch_size=16)
        d = part.modules[i].outputs[0].shape[-1]
        stage = monomod.stitch(student.stages[i], d, d)
        prefix, suffix = meta.stages[:i], meta.stages[i + 1:]
        del student
        optimizer = torch.optim.AdamW(stage.parameters())
        for _ in range(steps):
            with torch.no_grad():
                h = x
                for m in prefix:
                    h = m(h)
                t = module(h)
                for m in suffix:
                    t = m(t)
            s = stage(h)
            for m in suffix:
                s = m(s)
            loss = m2mkd_loss(s, t, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"mode": mode, "teacher": teacher_name, "base_mib": round(base, 1),
               "peak_mib": round(peak, 1), "peak_over_base_mib": round(peak - base, 1)})


def _save_teacher(teacher: str, path: str, img_size: int) -> None:
    from safetensors.torch import save_file

    import monomod

    save_file(monomod.load_model(teacher, img_size=img_size, num_classes=10).state_dict(), path)


def measure(mode: str, teacher: str, path: str, k: int = 4, steps: int = 3, img_size: int = 224, batch: int = 8) -> dict[str, Any]:
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
                     "ratio_over_base": round(kd["peak_over_base_mib"] / max(m2mkd["peak_over_base_mib"], 1e-9), 2)})
        print(f"  {teacher}: m2mKD {m2mkd['peak_over_base_mib']} MiB, KD {kd['peak_over_base_mib']} MiB", flush=True)
    return {"rows": rows, "k": 4, "steps": 3, "img_size": 224, "batch": 8}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| teacher | m2mKD job peak (MiB) | whole-model KD peak (MiB) | above framework: m2mKD | KD | KD / m2mKD |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['teacher']} | {r['m2mkd']['peak_mib']} | {r['kd']['peak_mib']} | "
                     f"{r['m2mkd']['peak_over_base_mib']} | {r['kd']['peak_over_base_mib']} | {r['ratio_over_base']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(json.dumps(run(quick=True), indent=2))
