"""Training and validation data read from a folder made by ``dodnet-preprocess`` (``scripts.data.preprocess``).

``LoadPatchd`` opens a case's arrays memory-mapped and copies out one training patch: 4 of 5 crops centred on a
stored foreground location, 1 of 5 anywhere, padding where the stored case is smaller than the patch (the same
crops as ``SpatialPadd`` + ``RandCropByPosNegLabeld`` on the whole volume, without reading it). Padding that
falls where the body crop removed air is air (-1), beyond the resampled grid 0 (as ``SpatialPadd``).
``LoadPreprocessedCased`` loads a whole preprocessed case (already resampled and windowed) for validation.
``load_preprocessed_datalist`` reads the folder's datalist and checks every case before training starts;
``cases_per_task`` caps the validation cases per task. Datasets built from these hold only paths, so a
process's memory does not grow with the number of cases.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.transforms.utils import correct_crop_centers

from scripts.cli_errors import UsageError
from scripts.data.datalist import DatalistError
from scripts.data.preprocess import CASE_RECORD_NAME, MANIFEST_NAME, PREPROCESS_VERSION

__all__ = ["LoadPatchd", "LoadPreprocessedCased", "load_preprocessed_datalist", "cases_per_task", "patch_window"]

PathLike = Union[str, os.PathLike]


def _open(path: str) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped (nothing is read until sliced)."""
    return np.load(path, mmap_mode="r")


def _case_record(item: Mapping[Hashable, Any]) -> Dict[str, Any]:
    path = Path(str(item["case"])) / CASE_RECORD_NAME
    return json.loads(path.read_text())


def patch_window(
    center: Sequence[int], patch_size: Sequence[int], shape: Sequence[int]
) -> Tuple[Tuple[slice, ...], List[Tuple[int, int]]]:
    """Where a patch centred at ``center`` of the zero-padded volume lies in the unpadded ``shape``.

    The volume is padded symmetrically to at least ``patch_size`` (``SpatialPad``'s "symmetric" method);
    ``center`` is in padded coordinates and the crop starts at ``center - patch_size // 2`` (``SpatialCrop``).

    Returns:
        ``(slices into the unpadded volume, [(pad before, pad after)] per axis)``.
    """
    slices, pads = [], []
    for c, p, s in zip(center, patch_size, shape):
        before = max(p - s, 0) // 2
        start = int(c) - p // 2 - before
        lo, hi = max(start, 0), min(start + p, s)
        slices.append(slice(lo, hi))
        pads.append((lo - start, start + p - hi))
    return tuple(slices), pads


class LoadPatchd(Randomizable, MapTransform):
    """Read one (1, *patch_size) training patch of a preprocessed case from its memory-mapped arrays.

    The item holds paths only: ``image`` and ``label`` (``.npy``, (1, H, W, D) float16 / uint8), ``locations``
    (``.npz``, per label value an (n, 3) sample of its voxel coordinates) and ``case`` (the case folder with
    ``case.json``). With probability ``pos / (pos + neg)`` the crop is centred on a stored foreground voxel,
    otherwise on a uniformly random voxel (centres moved inwards so the patch lies inside the padded volume, as
    ``RandCropByPosNegLabeld`` does). ``class_balanced`` False picks a foreground voxel with the probability of
    its label value's voxel count (uniform over the foreground, as ``RandCropByPosNegLabeld``); True picks the
    value first, uniformly (nnU-Net's way, oversampling small tumors).

    Output: ``image`` (1, *patch_size) float32 and ``label`` (1, *patch_size) float32 source values, MetaTensors
    with the patch's affine. Label regions outside the stored case are 0; image regions are ``crop_fill`` where
    they lie inside the resampled grid (air the body crop removed, recorded as ``crop_start`` and
    ``resampled_shape`` in ``case.json``) and ``image_pad_value`` beyond it.

    Args:
        keys: the image and label keys, in that order.
        patch_size: the spatial size of a patch, (H, W, D).
        pos: weight of foreground-centred crops.
        neg: weight of crops centred anywhere.
        locations_key: key of the ``.npz`` path with the foreground locations.
        class_balanced: pick the foreground label value uniformly rather than by voxel count.
        image_pad_value: image value where the patch extends beyond the resampled grid (``SpatialPadd``'s 0).
        crop_fill: image value where the patch reaches into what the body crop removed (-1: the HU window's
            floor, air).
    """

    def __init__(
        self,
        keys: Sequence[str] = ("image", "label"),
        patch_size: Sequence[int] = (192, 192, 64),
        pos: float = 4.0,
        neg: float = 1.0,
        locations_key: str = "locations",
        class_balanced: bool = False,
        image_pad_value: float = 0.0,
        crop_fill: float = -1.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 2:
            raise ValueError(f"LoadPatchd needs keys (image, label), got {self.keys}")
        if pos < 0 or neg < 0 or pos + neg <= 0:
            raise UsageError(
                f"pos and neg (train.json's foreground_crops and random_crops) must be non-negative and not both zero,"
                f" got {pos} and {neg}"
            )
        self.patch_size = tuple(int(p) for p in patch_size)
        self.pos_ratio = float(pos) / float(pos + neg)
        self.locations_key = locations_key
        self.class_balanced = class_balanced
        self.image_pad_value = float(image_pad_value)
        self.crop_fill = float(crop_fill)
        self._center: Optional[Tuple[int, ...]] = None

    def randomize(self, shape: Sequence[int], locations: Mapping[str, np.ndarray], counts: Mapping[str, int]) -> None:
        """Choose the crop centre (padded coordinates) for a case of spatial ``shape``."""
        padded = [max(s, p) for s, p in zip(shape, self.patch_size)]
        before = np.array([max(p - s, 0) // 2 for s, p in zip(shape, self.patch_size)])
        values = [v for v in sorted(locations) if len(locations[v])]
        if values and self.R.rand() < self.pos_ratio:
            if self.class_balanced:
                value = values[self.R.randint(len(values))]
            else:
                weights = np.array([float(counts.get(v, len(locations[v]))) for v in values])
                value = values[int(self.R.choice(len(values), p=weights / weights.sum()))]
            center = locations[value][self.R.randint(len(locations[value]))] + before
        else:
            center = np.array([self.R.randint(s) for s in padded])
        self._center = tuple(int(c) for c in correct_crop_centers(list(center), self.patch_size, padded))

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        image_key, label_key = self.keys
        image_mm, label_mm = _open(d[image_key]), _open(d[label_key])
        record = _case_record(d)
        with np.load(d[self.locations_key]) as npz:
            locations = {k: npz[k] for k in npz.files}
        self.randomize(image_mm.shape[1:], locations, record.get("voxels_per_value", {}))
        assert self._center is not None
        slices, pads = patch_window(self._center, self.patch_size, image_mm.shape[1:])
        affine = torch.as_tensor(record["affine"], dtype=torch.float64)
        affine[:3, 3] += affine[:3, :3] @ torch.as_tensor([s.start - p[0] for s, p in zip(slices, pads)]).double()
        padded = any(p != (0, 0) for p in pads)
        for key, array in ((image_key, image_mm), (label_key, label_mm)):
            patch = np.asarray(array[(slice(None), *slices)], dtype=np.float32)  # copies out the patch only
            if padded and key == image_key:
                patch = np.pad(patch, [(0, 0), *pads], mode="constant", constant_values=self.crop_fill)
                beyond = _beyond_grid(slices, pads, record["crop_start"], record["resampled_shape"])
                patch[0][beyond] = self.image_pad_value
            elif padded:
                patch = np.pad(patch, [(0, 0), *pads], mode="constant", constant_values=0)
            d[key] = MetaTensor(torch.from_numpy(patch), affine=affine.clone(), meta={"filename_or_obj": d[key]})
        return d


def _beyond_grid(
    slices: Sequence[slice], pads: Sequence[Tuple[int, int]], crop_start: Sequence[int], grid: Sequence[int]
) -> np.ndarray:
    """Bool (*patch_size) mask of a patch's voxels outside the resampled grid (``patch_window``'s ``slices`` and
    ``pads`` in the stored, cropped case; ``crop_start``: where that case starts in the resampled grid of shape
    ``grid``)."""
    inside = []
    for s, (before, after), start, size in zip(slices, pads, crop_start, grid):
        coords = np.arange(s.start - before, s.stop + after) + int(start)
        inside.append((coords >= 0) & (coords < int(size)))
    return ~(inside[0][:, None, None] & inside[1][None, :, None] & inside[2][None, None, :])


class LoadPreprocessedCased(MapTransform):
    """Load whole preprocessed cases: ``keys`` ``.npy`` paths -> (1, H, W, D) float32 MetaTensors with the case's
    affine (already resampled and windowed, so nothing is resampled again)."""

    def __init__(self, keys: Sequence[str] = ("image", "label"), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> Dict[Hashable, Any]:
        d = dict(data)
        affine = torch.as_tensor(_case_record(d)["affine"], dtype=torch.float64)
        for key in self.key_iterator(d):
            array = np.load(d[key]).astype(np.float32)
            d[key] = MetaTensor(torch.from_numpy(array), affine=affine.clone(), meta={"filename_or_obj": d[key]})
        return d


def _check_case(item: Dict[str, Any]) -> List[str]:
    """Problems of one preprocessed item: missing files, truncated arrays, shapes that disagree."""
    problems = []
    try:
        record = _case_record(item)
    except (OSError, ValueError) as err:
        return [f"case record {Path(item['case']) / CASE_RECORD_NAME} is missing or unreadable ({err})"]
    shapes = {}
    for key in ("image", "label"):
        try:
            shapes[key] = _open(item[key]).shape
        except (OSError, ValueError) as err:  # numpy: "mmap length is greater than file size" when truncated
            problems.append(f"{key} {item[key]} is missing, truncated or not a .npy array ({err})")
    try:
        with np.load(item["locations"]) as npz:
            npz.files
    except (OSError, ValueError) as err:
        problems.append(f"locations {item['locations']} is missing or unreadable ({err})")
    expected = (1, *record.get("shape", []))
    for key, shape in shapes.items():
        if tuple(shape) != tuple(expected):
            problems.append(f"{key} {item[key]} has shape {tuple(shape)}, its case.json says {expected}")
    return problems


def load_preprocessed_datalist(
    preprocessed_dir: PathLike, split: str = "training", check: bool = True
) -> List[Dict[str, Any]]:
    """One split of a ``dodnet-preprocess`` folder's datalist, with absolute paths, every case checked.

    Args:
        preprocessed_dir: the folder written by ``dodnet-preprocess``.
        split: ``"training"``, ``"validation"`` or ``"test"``.
        check: open every case's arrays (headers only) and check them against its ``case.json``.

    Raises:
        DatalistError: no manifest, a manifest of another format version, a missing split, or bad cases
            (all listed, with file names).
    """
    root = Path(os.path.expanduser(str(preprocessed_dir)))
    manifest_path = root / MANIFEST_NAME
    try:
        manifest = json.loads(manifest_path.read_text())
        version = manifest["params"]["version"]
        content = json.loads((root / "datalist.json").read_text())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatalistError(f"preprocessed_dir {root}: not a complete dodnet-preprocess folder ({err})") from None
    if version != PREPROCESS_VERSION:
        raise DatalistError(
            f"preprocessed_dir {root} has format version {version}, this bundle reads {PREPROCESS_VERSION}: "
            "preprocess the datalist again"
        )
    items = content.get(split) if isinstance(content, dict) else None
    if not isinstance(items, list) or not items:
        raise DatalistError(f"preprocessed_dir {root}: the datalist has no (or an empty) {split!r} list")
    out = []
    for item in items:
        item = dict(item)
        for key in ("image", "label", "locations", "case"):
            item[key] = str(root / item[key])
        out.append(item)
    if check:
        bad = [f"  - {item['case']}: {p}" for item in out for p in _check_case(item)]
        if bad:
            raise DatalistError(f"preprocessed_dir {root}, split {split!r}: unusable cases:\n" + "\n".join(bad))
    return out


def cases_per_task(
    items: Optional[Sequence[Dict[str, Any]]], limit: Optional[int] = None, task_key: str = "task"
) -> Optional[List[Dict[str, Any]]]:
    """At most ``limit`` items per task, evenly spread over each task's items in list order (deterministic);
    ``limit`` None keeps all; ``items`` None (a disabled datalist) stays None."""
    if items is None or limit is None:
        return None if items is None else list(items)
    if int(limit) < 1:
        raise ValueError(f"val_cases_per_task must be >= 1 or null, got {limit!r}")
    by_task: Dict[Any, List[int]] = {}
    for index, item in enumerate(items):
        by_task.setdefault(item[task_key], []).append(index)
    keep = set()
    for indices in by_task.values():
        n = min(int(limit), len(indices))
        keep.update(indices[int(i)] for i in np.linspace(0, len(indices) - 1, n).round().astype(int))
    return [item for index, item in enumerate(items) if index in keep]
