"""The deterministic CT preprocessing chain, defined once and shared by training, evaluation and inference.

Configs build it with ``{"_target_": "scripts.data.ct_preprocessing", "pixdim": "@pixdim", "hu_range":
"@hu_range", ...}`` and concatenate the returned flat list into their own ``Compose``
(``"$@preprocessing_steps + [...]"``), so dataset caching sees individual transforms and ``Invertd`` can undo
orientation and resampling. ``ct_loader`` is the chain's first step on its own, for configs that check the
loaded image before resampling it (``inference.json`` builds the chain with ``load: false`` after it).
"""

from __future__ import annotations

from typing import List, Sequence, Union

import numpy as np
from monai.transforms import (
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    Spacingd,
)

from scripts.data.body_crop import BodyCropd
from scripts.utils import as_bool

__all__ = ["ct_loader", "ct_preprocessing", "DEFAULT_PIXDIM", "DEFAULT_HU_RANGE"]

DEFAULT_PIXDIM = (0.8, 0.8, 1.5)
DEFAULT_HU_RANGE = (-325.0, 325.0)


def ct_loader(keys: Sequence[str] = ("image",)) -> LoadImaged:
    """The chain's loading step: ITK reader (NIfTI, NRRD, MHA, DICOM series folders), channel first, image only."""
    return LoadImaged(keys=list(keys), reader="ITKReader", ensure_channel_first=True, image_only=True)


def ct_preprocessing(
    image_key: str = "image",
    label_keys: Sequence[str] = (),
    pixdim: Sequence[float] = DEFAULT_PIXDIM,
    hu_range: Sequence[float] = DEFAULT_HU_RANGE,
    axcodes: str = "RAS",
    load: bool = True,
    image_mode: str = "bilinear",
    body_crop: Union[bool, str] = False,
) -> List[MapTransform]:
    """Load, orient, resample and normalize a CT image (and optionally its labels).

    Steps: ``LoadImaged`` (ITK: NIfTI, NRRD, DICOM series folders; channel first) -> ``Orientationd``
    (``axcodes``; RAS puts the slice axis last, so the layout is (C, H, W, D)) -> ``Spacingd``
    (``pixdim`` mm in (H, W, D) order: 0.8 x 0.8 x 1.5 by default; image ``image_mode``, labels
    nearest) -> ``ScaleIntensityRanged`` (HU clipped to ``hu_range`` and mapped to [-1, 1]) ->
    ``BodyCropd`` (only with ``body_crop``: the body's bounding box, invertible) -> ``EnsureTyped`` (float32 image).

    Args:
        image_key: key of the CT image.
        label_keys: keys of label maps resampled with nearest-neighbour interpolation.
        pixdim: target voxel spacing in mm, (H, W, D) order.
        hu_range: HU window mapped to [-1, 1].
        axcodes: target orientation.
        load: include the ``LoadImaged`` step (False when images arrive as tensors, as in MONAI Label).
        image_mode: interpolation of the image ("bilinear" is trilinear in 3-D; 3 is cubic spline).
        body_crop: crop image and labels to the body's bounding box (``scripts.data.body_crop``).

    Returns:
        a flat list of dictionary transforms.
    """
    keys = [image_key, *label_keys]
    steps: List[MapTransform] = []
    if load:
        steps.append(ct_loader(keys))
    steps += [
        # readers convert to RAS world coordinates, so axis labels are the RAS ones (explicit: MONAI's default moves)
        Orientationd(keys=keys, axcodes=axcodes, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        # float32 resampling grids: float64 (MONAI's default) doubles the transient memory of resampling a whole
        # CT and of inverting it (Invertd) for no visible gain (coordinate error ~1e-5 voxel)
        Spacingd(keys=keys, pixdim=tuple(pixdim), mode=[image_mode] + ["nearest"] * len(label_keys), dtype=np.float32),
        ScaleIntensityRanged(
            keys=image_key, a_min=float(hu_range[0]), a_max=float(hu_range[1]), b_min=-1.0, b_max=1.0, clip=True
        ),
    ]
    if as_bool(body_crop):  # a flag from the command line may arrive as "false"
        steps.append(BodyCropd(keys=keys, source_key=image_key, hu_range=hu_range))
    steps.append(EnsureTyped(keys=image_key, dtype="float32"))
    return steps
