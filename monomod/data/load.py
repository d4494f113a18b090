"""``load_data``: a data spec to its bundle of splits (train, val, OOD)."""
from __future__ import annotations

from typing import Any


from monomod.errors import MonomodError
from monomod.data.fewshot import few_shot
from monomod.data.folders import imagefolder_bundle, ood_folder_set
from monomod.data.sets import DataBundle, digits_bundle, synthetic_bundle
from monomod.data.spec import DataSpec, parse_data_spec

# ------------------------------------------------------------------------------------------------------- public API


def load_data(
    spec: str | DataSpec,
    *,
    img_size: int,
    in_chans: int = 3,
    ood: str | None = "auto",
    seed: int = 0,
    augment: bool = True,
    data_config: dict[str, Any] | None = None,
) -> DataBundle:
    """Load the task named by ``spec``: ``digits`` (built in), ``synthetic`` (smoke tests) or ``imagefolder:PATH``.

    ``ood``: ``"auto"`` gives each kind its default OOD split (digits: fixed corruptions of the test split, one per
    image; synthetic: its shifted split; imagefolder: none), ``"compound"`` (digits) the test split with
    ``DIGITS_COMPOUND`` applied to every image at once, ``None`` (or ``"none"``) gives none, and
    ``"imagefolder:PATH2"`` loads ``PATH2/val`` (or ``PATH2``) with labels mapped to the IID classes by folder name.
    ``seed`` only picks the synthetic data; the digits split is fixed so every run evaluates on the same images.
    ``augment`` turns on the light random train augmentation (``DataBundle.train_with`` adds the paper's); val and
    OOD are never augmented. ``data_config`` (timm's ``resolve_data_config`` of the teacher) gives image folders their
    mean, std, interpolation and crop fraction; in-memory sets normalise with their own statistics.
    """
    parsed = parse_data_spec(spec)
    if not isinstance(img_size, int) or img_size < 1:
        raise MonomodError(f"img_size must be a positive integer, got {img_size!r}", "pass e.g. img_size=32")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise MonomodError(f"in_chans must be a positive integer, got {in_chans!r}",
                           "pass 3 for RGB or 1 for grayscale")
    ood_folder: str | None = None
    if ood is None or ood == "none":
        want_ood = False
    elif ood in ("auto", "compound"):
        want_ood = True
    elif isinstance(ood, str) and ood.startswith("imagefolder:") and ood[len("imagefolder:"):]:
        want_ood, ood_folder = False, ood[len("imagefolder:"):]
    else:
        raise MonomodError(f"unknown OOD spec {ood!r}", "use 'auto', 'compound', None or 'imagefolder:PATH'")

    if ood == "compound" and parsed.kind != "digits":
        raise MonomodError(f"ood='compound' is built for the digits data, not {parsed.kind}",
                           "use ood='auto', or bring your own OOD set with ood='imagefolder:PATH'")
    if parsed.kind == "digits":
        bundle = digits_bundle(img_size, in_chans, want_ood, augment, compound=ood == "compound")
    elif parsed.kind == "synthetic":
        bundle = synthetic_bundle(img_size, in_chans, want_ood, augment, seed)
    else:
        bundle = imagefolder_bundle(parsed.path, img_size, in_chans, augment, data_config)
    if parsed.shots is not None:
        bundle.train = few_shot(bundle.train, parsed.shots, bundle.num_classes)
        bundle.name = f"{bundle.name},shots={parsed.shots}"
    if ood_folder is not None:
        bundle.ood = ood_folder_set(ood_folder, bundle)
    return bundle
