"""Body crop: windows only where the body is, found on a cheap downsampled copy of the CT.

Most of a CT's field of view is air and table; every sliding window there costs a full network pass. ``BodyCropd``
is MONAI's ``CropForegroundd`` with a body detector as its selection function: the largest connected component
above a HU threshold on a copy strided by ``downsample`` in each axis, its bounding box scaled back and widened by
``margin`` voxels. The crop is recorded like any MONAI crop, so ``Invertd`` pads the prediction back to the full
grid and every output stays exactly in the input's geometry. No body found (an empty image) keeps the whole grid.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
import torch
from monai.transforms import CropForegroundd
from monai.transforms.utils import get_largest_connected_component_mask

from scripts.utils import as_bool

__all__ = ["DEFAULT_BODY_HU", "hu_to_scaled", "body_bounding_box", "BodyMask", "BodyCropd"]

DEFAULT_BODY_HU = -300.0
"""Soft tissue and fat lie above it, air (-1000 HU) and lung parenchyma below."""


def hu_to_scaled(hu: float, hu_range: Sequence[float]) -> float:
    """A HU value in the chain's [-1, 1] intensity scale (``ScaleIntensityRanged`` of ``hu_range``)."""
    low, high = float(hu_range[0]), float(hu_range[1])
    return 2.0 * (float(hu) - low) / (high - low) - 1.0


def body_bounding_box(
    image: Union[torch.Tensor, np.ndarray], threshold: float, downsample: int = 4
) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """Bounding box ``(start, end)`` (end exclusive) of the body in a (C, H, W, D) image.

    The body is the largest connected component of ``image[0] > threshold`` on the copy strided by ``downsample``;
    its box is scaled back to full resolution, out to the strided samples just outside it. No voxel above the
    threshold: the whole grid.
    """
    spatial = tuple(int(s) for s in image.shape[1:])
    step = max(1, int(downsample))
    coarse = torch.as_tensor(image[0][(slice(None, None, step),) * len(spatial)]) > threshold
    if not bool(coarse.any()):
        return (0,) * len(spatial), spatial
    body = get_largest_connected_component_mask(coarse[None])[0]
    start, end = [], []
    for axis in range(len(spatial)):
        other = tuple(a for a in range(len(spatial)) if a != axis)
        hits = torch.nonzero(body.any(dim=other) if other else body).flatten()
        # the body's edge lies between the last strided sample outside and the first inside
        start.append(max(0, (int(hits[0]) - 1) * step + 1))
        end.append(min(spatial[axis], (int(hits[-1]) + 1) * step))
    return tuple(start), tuple(end)


class BodyMask:
    """Selection function for ``CropForegroundd``: True inside the body's bounding box (``body_bounding_box``).

    Args:
        threshold: body threshold in the image's intensity units.
        downsample: stride of the copy the body is found on.

    Call: image (C, H, W, D) -> bool mask (C, H, W, D).
    """

    def __init__(self, threshold: float, downsample: int = 4) -> None:
        self.threshold = float(threshold)
        self.downsample = int(downsample)

    def __call__(self, image: Union[torch.Tensor, np.ndarray]) -> torch.Tensor:
        start, end = body_bounding_box(image, self.threshold, self.downsample)
        mask = torch.zeros(tuple(image.shape), dtype=torch.bool)
        mask[(slice(None),) + tuple(slice(s, e) for s, e in zip(start, end))] = True
        return mask


class BodyCropd(CropForegroundd):
    """Crop ``keys`` to the body's bounding box found on ``source_key`` (invertible, see the module docstring).

    Args:
        keys: items cropped alike (the image, and labels when training).
        source_key: the CT image, (1, H, W, D).
        hu_range: the chain's HU window: the image is in its [-1, 1] scale.
        body_hu: body threshold in HU (converted to the image's scale).
        margin: voxels kept around the body in each axis (clipped at the image border).
        downsample: stride of the copy the body is found on.
        enabled: False keeps every image whole (a no-op, so configs can switch the crop by an id).

    Adds ``body_crop`` to the data: ``start``, ``end`` (the box on the resampled grid), ``grid_shape`` and the
    ``fraction`` of the grid's voxels kept (for the case report).
    """

    def __init__(
        self,
        keys: Union[str, Sequence[str]],
        source_key: str = "image",
        hu_range: Sequence[float] = (-325.0, 325.0),
        body_hu: float = DEFAULT_BODY_HU,
        margin: int = 8,
        downsample: int = 4,
        enabled: Union[bool, str] = True,
        allow_missing_keys: bool = False,
    ) -> None:
        enabled = as_bool(enabled)
        select = BodyMask(hu_to_scaled(body_hu, hu_range), downsample) if enabled else (lambda x: x == x)
        super().__init__(
            keys,
            source_key=source_key,
            select_fn=select,
            margin=int(margin),
            allow_smaller=True,
            allow_missing_keys=allow_missing_keys,
        )
        self.enabled = bool(enabled)

    def __call__(self, data, lazy=None):  # type: ignore[override]
        grid = [int(s) for s in data[self.source_key].shape[1:]]
        out = super().__call__(data, lazy=lazy)
        kept = [int(s) for s in out[self.source_key].shape[1:]]
        start = [int(v) for v in out.get(self.start_coord_key, [0] * len(grid))]
        out["body_crop"] = {
            "enabled": self.enabled,
            "start": start,
            "end": [s + k for s, k in zip(start, kept)],
            "grid_shape": grid,
            "fraction": float(np.prod(kept) / max(1, np.prod(grid))),
        }
        return out
