"""The fused m2mKD job (``--m2mkd fused``, laid out by ``monomod.passes.fuse``): the K m2mKD jobs of a plan as one.

Each batch is loaded and augmented once; the frozen meta prefix ``meta[:i](x)`` is computed once, progressively
(``meta[:i+1](x) = meta[i](meta[:i](x))``), for every i; each teacher hybrid gives its targets on it; all K students
step on the same batch. What each student computes is what its separate job computes on the same batches:

- the same initialisation (the student built from the run's seed, its stitch layers from the member's own seed);
- the same loss (``member_loss``, the separate job's) and the same schedule (the members share every training
  setting but the seed: ``monomod.passes.fuse.shared_train_config``);
- one backward of the summed losses, which gives each student exactly its own loss's gradients (the students
  share no parameters and the context carries no gradient), clipped per student (``clip_groups``), and AdamW,
  whose update is elementwise, so one optimizer over all students updates each as its own would;
- its own random stream (dropout, drop-path): the state of the member's seed, swapped in around its forward and
  kept in the checkpointed ``rng_states`` buffer, so a killed fused job resumes bitwise.

The batches are those of the first member (its seed orders, augments and mixes them), so student 0 comes out
bitwise equal to its separate job, and every student equal to a separate job given the same batches
(tests/test_fused.py). Products: ``jobs/m2mkd-fused/module-i.safetensors``, published as ``jobs/m2mkd-i/`` by the
``m2mkd:i`` jobs that follow, with the hybrid accuracies each separate job measures.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from monomod.errors import MonomodError
from monomod.io import atomic_save_tensors
from monomod.passes.fuse import fused_product, shared_train_config
from monomod.plan import Job
from monomod.runtime.config import TrainConfig, resolve_device, resolve_precision
from monomod.runtime.distributed import is_writer
from monomod.runtime.losses import m2mkd_stage_loss
from monomod.runtime.train import param_groups

# ``--m2mkd auto`` per device type, from measurements (benchmarks/RESULTS.md). CPU: the demo's m2mKD phase ran
# 1.30-1.38x faster fused than as four separate jobs one after another (3 seeds, the demo's threads, quiet 2-core
# machine), and as fast as the separate jobs side by side on two process workers; the separate jobs stay the way
# several machines share the work (--m2mkd separate). CUDA: nothing measured yet, so separate. One entry flips one.
AUTO_M2MKD = {"cpu": "fused", "cuda": "separate"}


def resolve_m2mkd(mode: str, device: torch.device | str | None = None) -> str:
    """``separate`` or ``fused``: ``auto`` is the mode measured faster on ``device`` (default: the one ``auto``
    picks), separate where nothing was measured."""
    if mode != "auto":
        return mode
    device = torch.device(device) if device is not None else resolve_device("auto")
    return AUTO_M2MKD.get(device.type, "separate")


# ------------------------------------------------------------------------------------------------- the students


class Member(nn.Module):
    """One student of a fused job: stitched student stage i, its frozen teacher module and the member's config."""

    def __init__(self, config: dict[str, Any], stitched: nn.Module, teacher_module: nn.Module) -> None:
        super().__init__()
        self.config, self.stitched = config, stitched
        self.teacher_module = [teacher_module]  # frozen context: kept out of the trainable's state and parameters

    @property
    def module(self) -> int:
        return self.config["module"]


class FusedStudents(nn.Module):
    """The trainable of a fused job: the K stitched student stages, and each one's random-number state (a buffer,
    so checkpoints hold it and a resume restores it)."""

    def __init__(self, members: list[Member], rng_states: list[Tensor]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.register_buffer("rng_states", torch.stack(rng_states))

    def clip_groups(self, weight_decay: float) -> list[list[nn.Parameter]]:
        """Each student's parameters in the order its separate job clips them (its AdamW groups')."""
        return [[p for group in param_groups(m.stitched, weight_decay) for p in group["params"]] for m in self.members]

    @contextmanager
    def own_rng(self, k: int, device: torch.device) -> Iterator[None]:
        """Run the block on member k's random stream (dropout draws from it), then store that stream and put the
        caller's back."""
        before = _get_rng(device)
        _set_rng(device, self.rng_states[k])
        try:
            yield
        finally:
            self.rng_states[k].copy_(_get_rng(device).to(self.rng_states.device))
            _set_rng(device, before)


def _get_rng(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _set_rng(device: torch.device, state: Tensor) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu().clone(), device)
    else:
        torch.set_rng_state(state.cpu().clone())  # a row of rng_states is a view; the setter wants its own tensor


def seeded_rng_state(seed: int, device: torch.device) -> Tensor:
    """The state ``device``'s generator has right after ``seed_everything(seed)``: where a separate job's random
    stream starts. The caller's state is kept."""
    before = _get_rng(device)
    torch.manual_seed(seed)
    state = _get_rng(device).clone()
    _set_rng(device, before)
    return state


# ------------------------------------------------------------------------------------------------------ the loss


def member_loss(member: Member, y: Tensor, features: tuple[Tensor, Tensor], logits: tuple[Tensor, Tensor],
                meta_features: Tensor | None, label_smoothing: float, last: bool) -> Tensor:
    """The separate m2mKD job's loss (``m2mkd_stage_loss``) for one member, from its student and teacher features
    (the stage's outputs), logits (the meta suffix's) and the meta model's own stage output (its boundary)."""
    (student_features, teacher_features), (student_logits, teacher_logits) = features, logits
    loss = m2mkd_stage_loss(member.config["loss"], y, (student_features, student_logits),
                            (teacher_features, teacher_logits), meta_features, label_smoothing, last)
    aux = member.stitched.aux_loss()
    return loss + aux if aux is not None else loss


def prefixes(stages: list[nn.Module], x: Tensor, starts: list[int]) -> list[Tensor]:
    """``meta[:i](x)`` for every i of ``starts`` (ascending), without autograd, each stage run once."""
    out, done = [], 0
    with torch.no_grad():
        for i in starts:
            for stage in stages[done:i]:
                x = stage(x)
            done = i
            out.append(x)
    return out


def suffixes(stages: list[nn.Module], starts: list[int], features: list[Tensor]) -> list[Tensor]:
    """``meta[i+1:](features[k])`` for every k (``i = starts[k]``), in batches: each stage runs once per shape of
    the streams that have reached it, concatenated along the batch. The stages are per-sample (no batch statistics
    in eval), so each stream's result is its own; one call instead of up to K cuts the per-call cost that
    dominates small inputs. (A NAC student's boundary carries its latents, the teacher's its tokens: streams of
    other shapes run apart.)"""
    groups: list[tuple[Tensor, list[int]]] = []
    for m, stage in enumerate(stages):
        for k in (k for k, i in enumerate(starts) if i + 1 == m):
            same = next((g for g, (x, _) in enumerate(groups) if x.shape[1:] == features[k].shape[1:]), None)
            if same is None:
                groups.append((features[k], [k]))
            else:
                x, members = groups[same]
                groups[same] = (torch.cat([x, features[k]]), [*members, k])
        groups = [(stage(x), members) for x, members in groups]
    done = {}
    for x, members in groups:
        done.update(zip(members, x.split(features[members[0]].shape[0])))
    return [done.get(k, features[k]) for k in range(len(features))]  # the last module has no suffix


def meta_boundaries(stages: list[nn.Module], members: list[Member], starts: list[int],
                    contexts: list[Tensor]) -> list[Tensor | None]:
    """``meta_i(meta[:i](x))`` for each member whose loss has a boundary term (None for the others): the next
    member's context where the prefix already computed it, one meta stage otherwise."""
    out: list[Tensor | None] = []
    with torch.no_grad():
        for k, (member, i) in enumerate(zip(members, starts)):
            if not member.config["loss"].get("boundary_loss") or i == len(stages) - 1:
                out.append(None)
            elif k + 1 < len(starts) and starts[k + 1] == i + 1:
                out.append(contexts[k + 1])
            else:
                out.append(stages[i](contexts[k]))
    return out


def fused_loss(students: FusedStudents, meta_stages: list[nn.Module], label_smoothing: float, device: torch.device):
    """``loss_fn(x, y)`` of the fused job: the meta prefix once, progressively; each member's teacher module and
    student stage on its context (the student on its own random stream); the meta suffix once per stage for all
    streams; every member's loss, summed (one backward gives each student its own loss's gradients)."""
    members = list(students.members)
    starts, last = [m.module for m in members], len(meta_stages) - 1

    def loss_fn(x: Tensor, y: Tensor) -> tuple[Tensor, None]:
        contexts = prefixes(meta_stages, x, starts)
        boundaries = meta_boundaries(meta_stages, members, starts, contexts)
        with torch.no_grad():
            teacher_features = [m.teacher_module[0](c) for m, c in zip(members, contexts)]
            teacher_logits = suffixes(meta_stages, starts, teacher_features)
        student_features = []
        for k, (member, context) in enumerate(zip(members, contexts)):
            with students.own_rng(k, device):
                student_features.append(member.stitched(context))
        student_logits = suffixes(meta_stages, starts, student_features)
        losses = [member_loss(m, y, (sf, tf), (sl, tl), mf, label_smoothing, m.module == last)
                  for m, sf, tf, sl, tl, mf in zip(members, student_features, teacher_features, student_logits,
                                                   teacher_logits, boundaries)]
        return torch.stack(losses).sum(), None

    return loss_fn


# -------------------------------------------------------------------------------------------------------- the jobs


def run_m2mkd_fused(ctx: Any, job: Job) -> dict[str, Any]:
    """Train the K students of ``job`` (see the module docstring), save each one's stage, and measure each one's
    hybrids as its separate job would. ``ctx`` is a ``monomod.runtime.jobs.RunContext``."""
    from monomod.runtime.evaluation import measure_hybrids
    from monomod.runtime.runners import _fit

    members_cfg = sorted(job.config["members"], key=lambda m: m["module"])  # the prefix runs progressively
    try:
        train_cfg = shared_train_config(members_cfg)
    except ValueError as e:
        raise MonomodError(f"the fused m2mKD job needs one schedule for every student: {e}",
                           "give every m2mKD job the same budget, or compile with --m2mkd separate") from None
    train_cfg.setdefault("num_classes", ctx.distill_classes)
    cfg = TrainConfig.from_json(train_cfg)
    device = resolve_device(cfg.device)
    meta = ctx.meta().to(device)
    students = _build_students(ctx, members_cfg, device)
    loss_fn = fused_loss(students, list(meta.stages), cfg.label_smoothing, device)
    info = _fit(ctx, job, students, loss_fn, cfg, clip_groups=students.clip_groups(cfg.weight_decay))
    precision = resolve_precision(cfg.precision, device)
    modules = {}
    for member in students.members:
        if is_writer():
            atomic_save_tensors(ctx.run_dir / fused_product(member.module), dict(member.stitched.state_dict()))
        stages = {"teacher_hybrid": member.teacher_module[0], "student_hybrid": member.stitched.eval()}
        modules[str(member.module)] = measure_hybrids(ctx, member.module, stages, precision=precision)
    return {**info, "modules": modules}


def _build_students(ctx: Any, members_cfg: list[dict[str, Any]], device: torch.device) -> FusedStudents:
    """Each member's teacher module and stitched student stage, built as its separate job builds them (the same
    calls in the same order, so the same initial weights), and the random state its separate job starts from."""
    from monomod.runtime.runners import m2mkd_pair

    members, states = [], []
    for config in members_cfg:
        teacher_module, stitched = m2mkd_pair(ctx, config, device)
        members.append(Member(config, stitched, teacher_module))
        states.append(seeded_rng_state(config["train"]["seed"], device))
    return FusedStudents(members, states)


def publish_member(ctx: Any, job: Job) -> dict[str, Any]:
    """An ``m2mkd:i`` job of a fused plan: student stage i of the fused job, verified, as this job's product, with
    what the fused job measured of module i, so everything downstream reads it as a separate job's."""
    fused = ctx.plan.job(job.config["fused"])
    problem = ctx.dirs.done_problem(fused)
    if problem is not None:
        raise MonomodError(f"job {job.name!r} publishes {fused.name!r}, which is {problem}",
                           f"run the plan: monomod run {ctx.run_dir}")
    i = job.config["module"]
    record = ctx.dirs.done(fused) or {}
    if is_writer():
        atomic_save_tensors(ctx.dirs.product(job.name), load_file(str(ctx.run_dir / fused_product(i))))
    result = record.get("result") or {}
    shared = {k: v for k, v in result.items() if k != "modules"}
    return {**shared, **(result.get("modules") or {}).get(str(i), {}), "fused": fused.name}
