"""The shared, lazily built pieces of a run that its jobs read: data, teacher, partition, meta model, students and
the products of finished jobs. Every job reads only the plan and its inputs' outputs under RUN_DIR, so any executor
can run it anywhere RUN_DIR is reachable."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file
from torch import nn

from monomod.errors import MonomodError, first_line
from monomod.io import atomic_save_tensors
from monomod.ir import Partition
from monomod.plan import Plan
from monomod.rundir import OTHER_HASH, RunDir
from monomod.runtime.config import resolve_device
from monomod.runtime.distributed import is_writer
from monomod.runtime.train import seed_everything
from monomod.students.base import StagedModel
from monomod.students.stitching import bridge


@dataclass
class RunContext:
    """Lazily built, shared pieces of a run: data, teacher, partition, meta model, students."""

    run_dir: Path
    plan: Plan
    loader_workers: int | None = None  # a run-time setting (not in the plan): None = monomod.data.default_workers
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        return self.plan.settings

    @cached_property
    def dirs(self) -> RunDir:
        return RunDir(self.run_dir)

    def job_dir(self, name: str) -> Path:
        return self.dirs.job_dir(name)

    @cached_property
    def data(self):
        """The task's data (``--data``): fine-tune, baseline and evaluation."""
        return self._load_data(self.data_spec(distill=False), self.settings["ood"])

    @cached_property
    def distill_data(self):
        """The data the teacher, meta, incubate and m2mKD jobs train on (``--distill-data``; no OOD split)."""
        return self._load_data(self.data_spec(distill=True), None)

    def data_spec(self, *, distill: bool) -> str:
        """The spec of the task's data or (``distill``) of the data distillation trains on, without loading it."""
        s = self.settings
        return (s.get("distill_data") or s["data"]) if distill else s["data"]

    def _load_data(self, spec: str, ood: str | None):
        """Image folders take the teacher's normalisation, interpolation and crop (its timm pretrained config, read
        from a weightless copy), whether or not the weights are pretrained."""
        from timm.data import resolve_data_config

        from monomod.data import load_data
        from monomod.frontend import load_model

        s = self.settings
        config = None
        if str(spec).startswith("imagefolder:") or str(ood).startswith("imagefolder:"):
            probe = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"])
            config = resolve_data_config({}, model=probe)
        return load_data(spec, img_size=s["img_size"], in_chans=s["in_chans"], ood=ood, data_config=config)

    def loader(self, split: str, batch_size: int, *, shuffle: bool, seed: int = 0, distill: bool = False,
               augment: Any = None, device: torch.device | None = None) -> Callable[[int], Any]:
        """``make_loader(epoch)`` over ``split`` of the task's data or (``distill``) the distillation data;
        ``augment`` (a ``monomod.data.Augment``) applies to ``train``, on ``device`` (the job's; default: the one
        ``auto`` picks) where the input path puts it there."""
        from monomod.data import make_loader

        bundle = self.distill_data if distill else self.data
        dataset = bundle.train_with(augment) if split == "train" else getattr(bundle, split)
        device = device if device is not None else resolve_device("auto")
        path = self.input_path(dataset, device) if split == "train" else "cpu"
        if path != "cpu":
            return self._device_loader(bundle, dataset, augment, batch_size, shuffle=shuffle, seed=seed,
                                       device=device, cached=path == "cached")
        return lambda epoch: make_loader(dataset, batch_size=batch_size, shuffle=shuffle, seed=seed, epoch=epoch,
                                         drop_last=shuffle and len(dataset) > batch_size,
                                         num_workers=self.loader_workers)

    def _device_loader(self, bundle: Any, dataset: Any, augment: Any, batch_size: int, *, shuffle: bool,
                       seed: int, device: torch.device, cached: bool) -> Callable[[int], Any]:
        """The device input path: in-memory sets moved there once (``device_data``), image folders decoded there
        a batch at a time or (``cached``) once into a pre-resized copy (``device_folder``)."""
        from monomod.data import TensorImageDataset, default_workers

        if isinstance(dataset, TensorImageDataset):
            from monomod.runtime.device_data import device_loader

            return device_loader(dataset, batch_size, shuffle=shuffle, seed=seed, device=device)
        from monomod.runtime.device_folder import folder_loader

        workers = self.loader_workers if self.loader_workers is not None else default_workers(dataset)
        return folder_loader(dataset, bundle, augment, batch_size, shuffle=shuffle, seed=seed, device=device,
                             workers=workers, cache_at=self.dirs.image_cache if cached else None)

    def input_path(self, dataset: Any, device: torch.device) -> str:
        """Where a job on ``device`` augments ``dataset``'s training batches: the path the plan asked for (``auto``
        where it records none), resolved here, so a plan compiled on a CPU takes the device path on a GPU node."""
        from monomod.data import TensorImageDataset
        from monomod.runtime.device_data import input_path_for

        return input_path_for(self.settings.get("input_path", "auto"), in_memory=isinstance(dataset, TensorImageDataset),
                              device=device)

    @property
    def distill_classes(self) -> int:
        return self.settings.get("distill_num_classes") or self.settings["num_classes"]

    # ----------------------------------------------------------------------------------------- teacher side

    def new_teacher(self) -> nn.Module:
        """The teacher as specified: timm init, pretrained weights or a local file, with this data's classifier."""
        from monomod.frontend import load_model, load_weights

        s = self.settings
        model = load_model(s["teacher"], pretrained=s["pretrained"], img_size=s["img_size"], in_chans=s["in_chans"],
                           num_classes=self.distill_classes)
        if s.get("weights"):
            load_weights(model, s["weights"], allow_new_classifier=True)
        return model

    def teacher(self) -> nn.Module:
        """The adapted teacher (output of the ``teacher`` job), frozen."""
        if "teacher" not in self._cache:
            model = self.new_teacher()
            model.load_state_dict(self.product("teacher"))
            self._cache["teacher"] = _frozen(model)
        return self._cache["teacher"]

    def partition(self, device: str = "meta") -> Partition:
        """The teacher's partition, replayed from the cuts the plan records (never searched again). Traced on the
        meta device by default: shapes and costs need no weights."""
        key = f"partition-{device}"
        if key not in self._cache:
            from monomod.frontend import load_model

            s = self.settings
            if device == "meta":
                model = load_model(s["teacher"], device="meta", img_size=s["img_size"], in_chans=s["in_chans"],
                                   num_classes=self.distill_classes)
            else:
                model = self.teacher()
            self._cache[key] = self._replay_cuts(model, device)
        return self._cache[key]

    def _replay_cuts(self, model: nn.Module, device: str) -> Partition:
        """``model`` traced on the run's input and cut where the plan's recorded partition cuts it."""
        from monomod.frontend import example_input
        from monomod.passes.partition import partition
        from monomod.passes.trace import trace
        from monomod.plan import PartitionRecord

        s = self.settings
        record = PartitionRecord.from_settings(s)
        example = example_input(s["in_chans"], s["img_size"], device=device)
        return partition(trace(model, example, name=s["teacher"]), s["modules"], cost=record.cost,
                         cuts=record.cuts)

    def teacher_module(self, i: int, source: str = "teacher") -> nn.Module:
        """Teacher module i, frozen, with only its own weights read from job ``source``'s product (the teacher, or
        ``incubate:i``): an m2mKD job never holds the whole teacher (the reference code builds the full model to
        use one stage). Models with non-persistent buffers (computed at init, absent from files) are built in full."""
        from safetensors import safe_open

        path = str(self.product_path(source))
        if self._has_computed_buffers():
            model = self.new_teacher()
            model.load_state_dict(load_file(path), strict=False)
            return _frozen(self._extract_from(model, i))
        module = self._empty_module(i)
        with safe_open(path, framework="pt") as f:
            module.load_state_dict({key: f.get_tensor(key) for key in module.state_dict()})
        return _frozen(module)

    def initial_teacher_module(self, i: int) -> nn.Module:
        """Teacher module i as Deep Incubation starts it: the teacher's given weights (``--weights``,
        ``--pretrained``) or timm's initialisation, trainable."""
        return self._extract_from(self.new_teacher(), i)

    def _extract_from(self, model: nn.Module, i: int) -> nn.Module:
        """Module i of ``model``, cut where the plan's partition cuts, with ``model``'s weights."""
        from monomod.passes.extract import extract

        if self._has_computed_buffers():
            return extract(self._replay_cuts(model, "cpu"))[i]
        module = self._empty_module(i)
        weights = model.state_dict()
        module.load_state_dict({key: weights[key] for key in module.state_dict()})
        return module

    def _empty_module(self, i: int) -> nn.Module:
        """Module i with uninitialised CPU tensors, to be loaded. A deep copy: extracted modules share their leaf
        modules with the traced model, so without it two modules extracted in one process would share weights."""
        from monomod.passes.extract import extract

        return copy.deepcopy(extract(self.partition("meta"))[i]).to_empty(device="cpu")

    def _has_computed_buffers(self) -> bool:
        return any(True for m in self.partition("meta").traced.model.modules() for _ in m._non_persistent_buffers_set)

    def new_meta(self) -> StagedModel:
        from monomod.students.meta import build_meta

        job = self.plan.job("meta")
        return build_meta(self.partition(), job.config.get("width"))

    def meta(self) -> StagedModel:
        """The context every m2mKD pair runs in: the trained meta model, or the teacher's own modules."""
        if "meta" not in self._cache:
            from monomod.students.meta import build_meta

            if self.settings["meta"] == "teacher":
                meta = build_meta(self.partition("cpu"), kind="teacher")
            else:
                meta = self.new_meta()
                meta.load_state_dict(self.product("meta"))
            self._cache["meta"] = _frozen(meta)
        return self._cache["meta"]

    # ----------------------------------------------------------------------------------------- student side

    def new_student(self, seed: int, *, upcycle: bool = False, num_classes: int | None = None) -> StagedModel:
        """A freshly initialised student; ``upcycle`` copies the teacher's MLPs into MoE experts (beyond the paper).
        ``num_classes`` sizes its head (default: the task's; m2mKD jobs pass the distillation data's)."""
        from monomod.students import build_student

        s = self.settings
        seed_everything(seed)
        student = build_student(s["student"], modules=s["modules"], num_classes=num_classes or s["num_classes"],
                                img_size=s["img_size"], in_chans=s["in_chans"], preset=s["student_preset"],
                                **s["student_overrides"])
        if upcycle and s["student"] == "moe":
            from monomod.students.moe import upcycle_experts

            if not upcycle_experts(student, self.teacher()):
                raise MonomodError("upcycling found no teacher MLP with the experts' shapes",
                                   "give the student the teacher's width (student_overrides.embed_dim), or drop upcycle")
        return student

    def stitched(self, student: StagedModel, i: int, kind: str):
        """Student stage i between stitch layers to and from the teacher's boundaries, chosen by their shapes."""
        from monomod.students.stitching import stitch_student

        return stitch_student(student, self.partition(), i, kind)

    def assembled_student(self) -> StagedModel:
        """The student structure the assemble job produced (stitches dropped, or bridged between the stages)."""
        student, mode = self.new_student(self.settings["seed"]), assembly_mode(self.plan)
        if mode != "dropped":
            stitched = self.all_stitched(student)
            student.stages = nn.ModuleList(bridge(stitched) if mode == "bridged" else stitched)
        return student

    def all_stitched(self, student: StagedModel) -> list:
        """Every stage of ``student`` between its m2mKD stitch layers."""
        kind = self.plan.job("m2mkd:0").config["stitch"]
        return [self.stitched(student, i, kind) for i in range(len(student.stages))]

    # ----------------------------------------------------------------------------------------- products

    def product_path(self, name: str) -> Path:
        """The path of job ``name``'s weights, verified against its done record (size, sha256)."""
        path = self.dirs.product(name)
        if not path.is_file():
            raise MonomodError(f"job {name!r} has not produced {path}", f"run the plan (monomod run {self.run_dir})")
        job = self.plan.job(name)
        problem = self.dirs.done_problem(job) if self.dirs.done_file(job).is_file() else None
        if problem is not None and problem != OTHER_HASH:
            raise MonomodError(f"job {name!r}: {problem}", f"run `monomod run {self.run_dir}` to make it again")
        return path

    def product(self, name: str) -> dict[str, torch.Tensor]:
        """Job ``name``'s weights, verified before they are read."""
        path = self.product_path(name)
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - a torn file of a job still running, or without a done record
            raise MonomodError(f"cannot read {path} ({first_line(e)})",
                               f"run `monomod run {self.run_dir}` to make it again") from None

    def save_product(self, name: str, module: nn.Module) -> None:
        if not is_writer():
            return  # under torchrun only rank 0 writes products
        atomic_save_tensors(self.dirs.product(name), dict(module.state_dict()))


def assembly_mode(plan: Plan) -> str:
    """``dropped`` or ``bridged``; or ``stitched`` for plans written before ``--assemble`` with ``keep_stitches``
    (each stage kept between its own stitches: bridged, unfused)."""
    config = plan.job("assemble").config
    return config.get("assemble") or ("stitched" if config.get("keep_stitches") else "dropped")


def _frozen(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()
