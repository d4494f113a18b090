"""Fuse pass: the K m2mKD jobs of a plan -> one ``m2mkd-fused`` job that trains all K students on one device
(``--m2mkd fused``), followed by K light ``m2mkd:i`` jobs that publish its per-module products.

```
separate:  teacher, meta ─▶ m2mkd:0 ┐            fused:  teacher, meta ─▶ m2mkd-fused ─▶ m2mkd:0 ┐
                         ─▶ m2mkd:1 ├─▶ assemble                                      ─▶ m2mkd:1 ├─▶ assemble
                         ─▶  ...    ┘                                                 ─▶  ...    ┘
```
The fused job loads and augments each batch once, runs the frozen meta prefix ``meta[:i](x)`` once for every i
and steps every student on the same batch (``monomod.runtime.fused``). Each ``m2mkd:i`` keeps its config (its
stitch, loss, seed: the student's own), so the jobs downstream (assemble, the report's module table) read
``jobs/m2mkd-i/`` exactly as in a separate plan. The separate jobs stay the layout for K machines sharing the
work. Pure: the same jobs give the same jobs.
"""
from __future__ import annotations

from typing import Any

from monomod.plan import Job
from monomod.rundir import module_product

FUSED = "m2mkd-fused"
M2MKD_MODES = ("separate", "fused")
# The one training-config key the students of a fused job need not share: each member's seed initialises its
# stitch layers and drives its own dropout; the first member's also orders, augments and mixes the shared batches.
OWN_TRAIN_KEYS = ("seed",)


def fuse_m2mkd(jobs: list[Job]) -> list[Job]:
    """``jobs`` with its m2mKD jobs replaced by one fused job and K publishing ``m2mkd:i`` jobs, in place of the
    first m2mKD job. A plan without m2mKD jobs comes back unchanged."""
    members = [job for job in jobs if job.kind == "m2mkd"]
    if not members:
        return list(jobs)
    inputs = list(dict.fromkeys(name for job in members for name in job.inputs))
    fused = Job(FUSED, FUSED, inputs, [fused_product(job.config["module"]) for job in members],
                {"members": [dict(job.config) for job in members]})
    published = [Job(job.name, job.kind, [FUSED], list(job.outputs), {**job.config, "fused": FUSED}) for job in members]
    first = jobs.index(members[0])
    rest = [job for job in jobs if job.kind != "m2mkd"]
    return [*rest[:first], fused, *published, *rest[first:]]


def fused_product(module: int) -> str:
    """Where the fused job writes student stage ``module`` (relative to RUN_DIR; ``RunDir`` spells it)."""
    return module_product(FUSED, module)


def shared_train_config(members: list[dict[str, Any]]) -> dict[str, Any]:
    """The training config of the fused job: the first member's (its seed orders and augments the batches), once
    every member agrees on all but ``OWN_TRAIN_KEYS`` (one schedule, one batch stream); a ``ValueError`` names the
    first key they disagree on."""
    first = members[0]["train"]
    for member in members[1:]:
        for key in sorted((set(first) | set(member["train"])) - set(OWN_TRAIN_KEYS)):
            if member["train"].get(key) != first.get(key):
                raise ValueError(f"m2mkd:{member['module']} has {key}={member['train'].get(key)!r}, "
                                 f"m2mkd:{members[0]['module']} {first.get(key)!r}")
    return dict(first)
