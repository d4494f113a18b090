"""Model specs -> ``nn.Module``: timm names and short aliases, local weight files, ``pkg.module:factory``."""
from __future__ import annotations

import contextlib
import difflib
import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monomod.errors import MonomodError, first_line, shorten

# Short names a user types -> the timm model they mean.
ALIASES: dict[str, str] = {
    **{f"vit_{s}": f"vit_{s}_patch16_224" for s in ("tiny", "small", "base", "large")},
    "vit_huge": "vit_huge_patch14_224",
    **{f"deit_{s}": f"deit_{s}_patch16_224" for s in ("tiny", "small", "base")},
    **{f"deit3_{s}": f"deit3_{s}_patch16_224" for s in ("small", "medium", "base", "large")},
    "deit3_huge": "deit3_huge_patch14_224",
}


def is_code(spec: object) -> bool:
    """A ``pkg.module:factory`` spec: building it imports and calls Python code."""
    return isinstance(spec, str) and ":" in spec


def check_trusted(values: dict[str, Any], source: str, trust_code: bool) -> None:
    """Refuse a teacher or student that a file (a recipe, a plan.yaml) names as code, unless ``trust_code``.

    Typing a factory on the command line is the user's choice; a file doing it is not (the ``trust_remote_code``
    convention): such code runs only with ``--trust-code``."""
    for key in ("teacher", "student"):
        spec = values.get(key)
        if is_code(spec) and not trust_code:
            raise MonomodError(f"{shorten(source)} names Python code as its {key} ({shorten(spec)!r}), which would be "
                               "imported and run", "pass --trust-code (trust_code=True) if you trust that file")


def resolve_name(spec: str) -> str:
    """Map an alias to its timm name; other names pass through unchanged."""
    return ALIASES.get(spec, spec)


def load_model(
    spec: str | nn.Module,
    *,
    weights: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device | None = None,
    **timm_kwargs: Any,
) -> nn.Module:
    """Build the model named by ``spec`` in eval mode.

    ``spec`` is a timm name or alias (``vit_base``), ``"pkg.module:factory"`` (any callable returning an
    ``nn.Module``; ``timm_kwargs`` are passed to it), or an ``nn.Module`` (returned as is). ``weights`` is a local
    ``.safetensors`` or ``.pth``/``.pt`` file, loaded without unpickling arbitrary objects. ``pretrained=True`` asks
    timm to download weights (needs network access). ``device="meta"`` builds the model without allocating
    parameters, which is enough for tracing shapes and FLOPs (``monomod inspect``).
    """
    timm_kwargs = {k: v for k, v in timm_kwargs.items() if v is not None}
    if isinstance(spec, nn.Module):
        model = spec
    elif ":" in spec:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = _from_factory(spec, timm_kwargs)
    else:
        model = _from_timm(resolve_name(spec), pretrained=pretrained, device=device, timm_kwargs=timm_kwargs)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def example_input(in_chans: int, img_size: int, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """The one-image batch ``(1, in_chans, img_size, img_size)`` a model is traced on; zeros, since tracing reads
    only shapes (``device="meta"`` allocates nothing)."""
    return torch.zeros(1, in_chans, img_size, img_size, device=device)


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise MonomodError(f"cannot import {spec!r} ({e})", "use 'package.module:factory' naming an importable callable") from None
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise MonomodError(f"cannot call {spec!r} with {kwargs}: {e}", "drop the options that factory does not take") from None
    if not isinstance(model, nn.Module):
        raise MonomodError(f"{spec!r} returned {type(model).__name__}, not an nn.Module", "point it at a factory that builds the model")
    return model


def _from_timm(name: str, *, pretrained: bool, device: str | torch.device | None, timm_kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if not timm.is_model(name):
        raise MonomodError(f"unknown model {shorten(name)!r}", _suggest(name))
    kwargs = dict(timm_kwargs)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        # Not every architecture takes img_size (CNNs are size-agnostic): drop it and build again.
        if "img_size" in kwargs and "img_size" in str(e):
            kwargs.pop("img_size")
            with torch.device(device) if device is not None else contextlib.nullcontext():
                return timm.create_model(name, pretrained=pretrained, **kwargs)
        raise MonomodError(f"cannot build {name!r} with {kwargs}: {e}", "drop or fix the offending option") from None
    except (AssertionError, ValueError, RuntimeError) as e:
        if pretrained and ("connect" in str(e).lower() or "resolve" in str(e).lower() or "offline" in str(e).lower()):
            raise MonomodError(f"cannot download pretrained weights for {name!r} ({e})", "go online, or pass a local file with --weights") from None
        raise MonomodError(f"cannot build {name!r} with {kwargs}: {first_line(e)}", "check --img-size, --patch-size and --in-chans") from None


def _suggest(name: str) -> str:
    import timm

    candidates = list(ALIASES) + timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if close:
        return "did you mean " + ", ".join(close) + "?"
    return "see `python -c \"import timm; print(timm.list_models('vit*'))\"` for names, or use 'pkg.module:factory'"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors or .pth/.pt without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise MonomodError(f"weights file {str(path)!r} does not exist", "check the path passed to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt, truncated or unsafe files all end here
        raise MonomodError(f"cannot read weights file {str(path)!r} ({first_line(e)})", "re-export it as .safetensors or a plain state-dict .pth") from None
    for key in ("state_dict", "model", "module"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MonomodError(f"weights file {str(path)!r} holds no tensor state dict", "save it with torch.save(model.state_dict(), path)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str | Path, *, allow_new_classifier: bool = False) -> None:
    """Load a local weight file into ``model``; absolute position embeddings are resampled to the model's grid.

    ``allow_new_classifier`` keeps the model's own (fresh) classifier when the file's has another number of classes,
    which is how a teacher trained elsewhere is adapted to new data.
    """
    state = load_state_dict(path)
    own = model.state_dict()
    for key, value in list(state.items()):
        if key in own and value.shape != own[key].shape and key.endswith("pos_embed") and value.ndim == 3:
            state[key] = _resample_pos_embed(model, value, own[key])
    if allow_new_classifier:
        head = _classifier_prefix(model)
        for key in [k for k in state if head and k.startswith(head + ".") and k in own and state[k].shape != own[k].shape]:
            state[key] = own[key]
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{what}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched))
            if keys
        )
        raise MonomodError(f"weights file {str(path)!r} does not fit the model ({detail})", "pass the matching model name and --num-classes/--img-size")
    model.load_state_dict(state)


def _classifier_prefix(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = cfg.get("classifier")
    return head if isinstance(head, str) else None


def _resample_pos_embed(model: nn.Module, value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return value
    return resample_abs_pos_embed(value, new_size=list(grid), num_prefix_tokens=prefix)

