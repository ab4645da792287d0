"""Inference inputs: finding the cases, naming them and rejecting bad files with a clear message.

A case is a NIfTI/NRRD/MetaImage file or a DICOM series folder. ``find_cases`` turns the config's
``input`` (a file, a folder of such files and DICOM series folders, or a list of both) into
``[{"image": path, "case": name}, ...]``; a path that does not exist stays a case so that the run
reports it as failed and still processes the others. ``check_input`` catches empty, truncated and
corrupt files and wrong dimensionality from the header, before the long work; ``CheckCTImaged``
(after loading) rejects images that are not single-channel 3-D volumes and warns when the
intensities do not look like Hounsfield units.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from scripts.data.file_checks import gzip_problem, nifti_truncation

__all__ = [
    "IMAGE_SUFFIXES",
    "BadInputError",
    "NonCTIntensityWarning",
    "find_cases",
    "case_name",
    "check_input",
    "dicom_series",
    "CheckCTImaged",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
PathLike = Union[str, os.PathLike]


class BadInputError(ValueError):
    """An input case that cannot be segmented; the message names the file and the problem."""


class NonCTIntensityWarning(UserWarning):
    """The image's intensities do not look like CT in Hounsfield units (the case is still segmented)."""


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return next((s for s in IMAGE_SUFFIXES if name.endswith(s)), "")


def case_name(path: PathLike) -> str:
    """The case name: the file name without its image suffix, or the DICOM folder's name."""
    p = Path(path)
    suffix = _suffix(p)
    return p.name[: len(p.name) - len(suffix)] if suffix else p.name


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_folder(path: Path) -> bool:
    return path.is_dir() and any(f.is_file() and _is_dicom(f) for f in path.iterdir())


def dicom_series(folder: PathLike) -> Dict[str, Dict[str, Any]]:
    """The DICOM series of a folder's files (pydicom, headers only), by SeriesInstanceUID.

    Returns:
        ``{uid: {"description": SeriesDescription, "modality": Modality, "files": count}}``; files without a
        SeriesInstanceUID are grouped under "".
    """
    import pydicom

    series: Dict[str, Dict[str, Any]] = {}
    tags = ["SeriesInstanceUID", "SeriesDescription", "Modality"]
    for f in sorted(Path(folder).iterdir()):
        if not (f.is_file() and _is_dicom(f)):
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True, specific_tags=tags)
        except Exception:  # an unreadable file: the reader reports the folder
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        entry = series.setdefault(
            uid,
            {"description": str(ds.get("SeriesDescription", "")), "modality": str(ds.get("Modality", "")), "files": 0},
        )
        entry["files"] += 1
    return series


def _check_single_series(p: Path) -> None:
    """Refuse a folder of several DICOM series (the reader would silently take one of them)."""
    series = dicom_series(p)
    if len(series) > 1:
        listed = "; ".join(
            f"{uid or '(no SeriesInstanceUID)'} {e['description']!r} ({e['modality'] or '?'}, {e['files']} files)"
            for uid, e in sorted(series.items())
        )
        raise BadInputError(
            f"{p}: holds {len(series)} DICOM series ({listed}); put each series in its own folder and pass "
            "the one to segment"
        )


def find_cases(input: Union[PathLike, Sequence[PathLike]]) -> List[Dict[str, str]]:
    """Expand the ``input`` of the inference config into cases.

    Args:
        input: a file, a DICOM series folder, a folder holding image files and/or DICOM series
            folders (not searched deeper), or a list of any of these.

    Returns:
        ``[{"image": path, "case": unique name}, ...]`` in input order (folders sorted by name).

    Raises:
        BadInputError: when ``input`` is empty or a folder holds no image and no DICOM series.
    """
    items = [input] if isinstance(input, (str, os.PathLike)) else list(input)
    if not items:
        raise BadInputError("no input given: pass a file, a folder or a list of files")
    paths: List[Path] = []
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir() and not _is_dicom_folder(p):
            # a dangling or looping symlink named like an image stays a case, reported as such when processed
            found = [
                c
                for c in sorted(p.iterdir())
                if ((c.is_file() or (c.is_symlink() and not c.exists())) and _suffix(c)) or _is_dicom_folder(c)
            ]
            if not found:
                raise BadInputError(
                    f"{p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders)"
                )
            paths.extend(found)
        else:
            paths.append(p)  # a file, a DICOM folder, or a missing path reported when it is processed
    cases, used = [], set()
    for p in paths:
        name = case_name(p)
        base, n = name, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        cases.append({"image": str(p), "case": name})
    return cases


def check_input(path: PathLike) -> None:
    """Reject a case that cannot be read, from cheap checks before loading.

    Checks: the path exists; a file is not empty; a gzip stream is complete and uncorrupted; a
    NIfTI header is readable, describes a 3-D volume and its data fits the file; a folder holds
    DICOM files.

    Raises:
        BadInputError: naming the file and the problem.
    """
    p = Path(path)
    try:
        p.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise BadInputError(f"{p}: is a symlink loop (the link points back at itself); fix or remove it") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise BadInputError(f"{p}: permission denied (cannot read it; check its permissions)") from None
        if p.is_symlink():
            raise BadInputError(f"{p}: is a broken symlink (to {os.readlink(p)})") from None
        raise BadInputError(f"{p}: does not exist") from None
    if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
        raise BadInputError(f"{p}: permission denied (cannot read it; check its permissions)")
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file()]
        if not files:
            raise BadInputError(f"{p}: empty folder (expected a DICOM series)")
        if not any(_is_dicom(f) for f in files):
            raise BadInputError(f"{p}: no DICOM files in this folder (expected a DICOM series)")
        _check_single_series(p)
        return
    size = p.stat().st_size
    if size == 0:
        raise BadInputError(f"{p}: empty file (0 bytes)")
    problem = gzip_problem(p) if p.name.lower().endswith(".gz") else None
    if problem is None and _suffix(p) in (".nii", ".nii.gz"):
        _check_nifti_header(p)
        problem = nifti_truncation(p)
    if problem:
        raise BadInputError(problem)


def _check_nifti_header(p: Path) -> None:
    """The NIfTI header is readable and describes one 3-D volume."""
    import nibabel as nib

    try:
        img = nib.load(str(p))
    except Exception as e:  # nibabel raises several types for bad headers
        raise BadInputError(f"{p}: not a readable NIfTI file ({type(e).__name__}: {e})") from None
    shape = tuple(int(s) for s in img.shape)
    spatial = shape[:3] if len(shape) > 3 and all(s == 1 for s in shape[3:]) else shape
    if len(spatial) < 3:
        raise BadInputError(f"{p}: is a {len(spatial)}-D image of shape {shape}; DoDNet needs a 3-D CT volume")
    if len(spatial) > 3:
        raise BadInputError(
            f"{p}: is a {len(spatial)}-D image of shape {shape}; DoDNet needs one 3-D CT volume "
            "(split time series or multi-channel images into 3-D files)"
        )


class CheckCTImaged(MapTransform):
    """After loading, before resampling: require a single-channel 3-D volume (1, H, W, D) of a size the resampling
    can hold; count NaN/inf voxels; warn about non-CT intensities.

    Args:
        keys: image keys (channel-first tensors with metadata, as ``LoadImaged`` gives them).
        min_air_hu: an image whose minimum is above this has no air or fat: warn (not HU?).
        min_max_hu: an image whose maximum is below this has no soft tissue: warn.
        pixdim: the spacing the preprocessing resamples to (mm); with ``max_resampled_voxels`` it bounds the grid.
        max_resampled_voxels: refuse an image whose resampled grid (estimated from its shape and spacing) would
            exceed this many voxels (None: no bound).
        max_nonfinite_fraction: refuse an image with more NaN/inf voxels than this fraction; fewer are counted
            in a warning and set to -1024 HU (air).
        bytes_per_voxel: memory per resampled voxel in the estimate shown (float32 image + 14 float16
            probability channels of all tasks).

    Raises:
        BadInputError: for 2-D, 4-D or multi-channel images, a resampled grid above the bound, an image that is
            mostly NaN/inf; naming the file.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        min_air_hu: float = -100.0,
        min_max_hu: float = 0.0,
        allow_missing_keys: bool = False,
        pixdim: Optional[Sequence[float]] = None,
        max_resampled_voxels: Optional[float] = None,
        max_nonfinite_fraction: float = 0.5,
        bytes_per_voxel: int = 32,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_air_hu = min_air_hu
        self.min_max_hu = min_max_hu
        self.pixdim = None if pixdim is None else [float(p) for p in pixdim]
        self.max_resampled_voxels = None if max_resampled_voxels is None else float(max_resampled_voxels)
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self.bytes_per_voxel = int(bytes_per_voxel)

    def _check_grid(self, img: torch.Tensor, source: str) -> None:
        """Refuse a resampled grid above ``max_resampled_voxels`` (estimated before Spacingd allocates it)."""
        affine = getattr(img, "affine", None)
        if self.pixdim is None or self.max_resampled_voxels is None or affine is None:
            return
        matrix = torch.as_tensor(affine, dtype=torch.float64)[:3, :3]
        spacing = torch.linalg.norm(matrix, dim=0).tolist()
        shape = [int(s) for s in img.shape[1:]]
        estimate = 1.0
        for axis, (size, sp) in enumerate(zip(shape, spacing)):
            target = self.pixdim[int(matrix[:, axis].abs().argmax())]  # the RAS axis this axis becomes
            estimate *= max(1.0, size * sp / target)
        if estimate > self.max_resampled_voxels:
            gb = estimate * self.bytes_per_voxel / 1e9
            raise BadInputError(
                f"{source}: spacing {tuple(round(s, 4) for s in spacing)} mm and shape {tuple(shape)} resample to "
                f"about {estimate:.3g} voxels at {tuple(self.pixdim)} mm (about {gb:.0f} GB), above "
                f"max_resampled_voxels {self.max_resampled_voxels:.3g}; check the header's spacing, crop the image, "
                "or raise max_resampled_voxels"
            )

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> Dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            source = _source_name(img, key)
            shape = tuple(img.shape)
            if img.dim() != 4:
                raise BadInputError(
                    f"{source}: is a {img.dim() - 1}-D image (shape {shape[1:]}, channel first {shape}); "
                    "DoDNet needs a 3-D CT volume"
                )
            if shape[0] != 1:
                raise BadInputError(
                    f"{source}: has {shape[0]} channels or time points (shape {shape}); "
                    "DoDNet needs one single-channel 3-D CT volume"
                )
            self._check_grid(img, source)
            finite = torch.isfinite(img)
            from_file = _nifti_finite_mask(source)  # ITK's NIfTI reader has already turned NaN/inf into 0
            if from_file is not None and tuple(from_file.shape) == tuple(img.shape[1:]):
                finite = finite & torch.as_tensor(from_file)[None]
                nan = int(np.isnan(_nifti_array(source)).sum())
            else:
                nan = int(torch.isnan(img).sum())
            bad = int(finite.numel() - finite.sum())
            if bad:
                counts = f"{bad} of {finite.numel()} voxels are not finite ({nan} NaN, {bad - nan} inf)"
                if bad > self.max_nonfinite_fraction * finite.numel():
                    raise BadInputError(f"{source}: {counts}; refused (not a usable CT)")
                message = f"{source}: {counts}; set to -1024 HU (air)"
                logger.warning(message)
                warnings.warn(message, NonCTIntensityWarning, stacklevel=2)
                img = img.clone()
                img.masked_fill_(~finite, -1024.0)
                d[key] = img
            modality = _dicom_modality(source)
            if modality not in ("", "CT"):
                message = (
                    f"{source}: DICOM Modality is {modality}, not CT; DoDNet is trained on CT in Hounsfield units, "
                    "the segmentation may be meaningless"
                )
                logger.warning(message)
                warnings.warn(message, NonCTIntensityWarning, stacklevel=2)
            low, high = float(img.min()), float(img.max())
            if low > self.min_air_hu or high < self.min_max_hu:
                message = (
                    f"{source}: intensities [{low:g}, {high:g}] do not look like CT in Hounsfield units "
                    "(no air/fat below "
                    f"{self.min_air_hu:g} HU or no tissue above {self.min_max_hu:g} HU); the segmentation may be "
                    "meaningless (MR, PET, or CT stored without rescale slope/intercept?)"
                )
                logger.warning(message)
                warnings.warn(message, NonCTIntensityWarning, stacklevel=2)
        return d


def _nifti_array(source: str) -> np.ndarray:
    import nibabel as nib

    return np.asanyarray(nib.load(source).dataobj)


def _nifti_finite_mask(source: str) -> Optional[np.ndarray]:
    """Which voxels of a floating-point NIfTI file are finite (None for other files and integer data)."""
    if not source.lower().endswith((".nii", ".nii.gz")) or not Path(source).is_file():
        return None
    import nibabel as nib

    if not np.issubdtype(nib.load(source).get_data_dtype(), np.floating):
        return None
    return np.isfinite(_nifti_array(source))


def _dicom_modality(source: str) -> str:
    """The Modality of a DICOM series folder ("" for files and folders without one)."""
    p = Path(source)
    if not p.is_dir():
        return ""
    modalities = sorted({e["modality"] for e in dicom_series(p).values() if e["modality"]})
    return "/".join(modalities)


def _source_name(img: torch.Tensor, key: Hashable) -> str:
    meta = getattr(img, "meta", {}) or {}
    name = meta.get("filename_or_obj")
    return str(name) if name else f"image {key!s}"
