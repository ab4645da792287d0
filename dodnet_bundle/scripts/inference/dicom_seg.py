"""DICOM Segmentation (SEG) output for a case segmented from a DICOM series, with highdicom.

The SEG references its source series frame by frame (each frame's Source Image Sequence names the CT
instance it lies on), shares the source's Frame of Reference, Patient and Study, and holds one BINARY
segment per structure found, described from the task table (``scripts.tasks``): label, SNOMED CT
category/type (and anatomic region for tumors and vessels), recommended display color (CIELab of the
table's RGB color), algorithm identification (DoDNet, the bundle version, artificial intelligence).

Geometry: the label map arrives in the geometry ITK read the series in (a RAS affine, axes in ITK's
order). ``highdicom.Volume.match_geometry`` permutes/flips it onto the source series' own grid
(frames in the order of their position along the slice normal, then rows, columns) without
resampling, so frame ``i`` is exactly the pixels of source instance ``i`` whatever the file order.

A case in which no structure was found has no SEG (a SEG needs at least one segment); its report says so.
"""

from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from scripts.data.cases import BadInputError
from scripts.tasks import StructureCodes, merged_label_colors, merged_label_names, structure_codes
from scripts.utils import BUNDLE_ROOT, atomic_output

__all__ = [
    "OUTPUT_TYPES",
    "parse_output_type",
    "dicom_seg_source_problem",
    "read_dicom_series",
    "series_geometry",
    "label_map_on_series",
    "segment_descriptions",
    "write_dicom_seg",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

OUTPUT_TYPES = ("nifti", "dicom_seg", "both")
"""Values of the ``output_type`` option: NIfTI label map (default), DICOM SEG, or both."""

# Geometry tolerance (unit-vector dot products, voxel fractions): DICOM stores direction cosines as
# decimal strings of at most 16 characters, which ITK and highdicom may orthonormalise differently.
_GEOMETRY_TOL = 1e-3


def parse_output_type(value: str) -> Tuple[bool, bool]:
    """``output_type`` -> (write NIfTI, write DICOM SEG).

    Raises:
        ValueError: for a value not in ``OUTPUT_TYPES``.
    """
    key = str(value).strip().lower().replace("-", "_")
    if key not in OUTPUT_TYPES:
        raise ValueError(f"output_type {value!r} is not one of {', '.join(OUTPUT_TYPES)}")
    return key in ("nifti", "both"), key in ("dicom_seg", "both")


def dicom_seg_source_problem(input: PathLike) -> Optional[str]:
    """None when ``input`` is a DICOM series folder; else the one-line reason no SEG can be written for it."""
    path = Path(input)
    if path.is_dir():
        return None
    return (
        f"{path}: DICOM SEG output needs a DICOM series folder as input (a SEG references its source images); "
        "this is an image file: use output_type nifti or both"
    )


@lru_cache(maxsize=1)
def _bundle_version() -> str:
    return str(json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"])


def read_dicom_series(folder: PathLike) -> List[Any]:
    """The headers (no pixel data) of the DICOM images in ``folder``, which must hold one series.

    Returns:
        ``pydicom.Dataset`` objects in file-name order.

    Raises:
        BadInputError: no image, or images of several series.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for f in sorted(Path(folder).iterdir()):
        if not f.is_file():
            continue
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "ImagePositionPatient" in ds and "SeriesInstanceUID" in ds:
            datasets.append(ds)
    if not datasets:
        raise BadInputError(f"{folder}: no DICOM images with a position in the patient to reference in a SEG")
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    if len(series) > 1:
        raise BadInputError(f"{folder}: holds {len(series)} DICOM series; a DICOM SEG references one (one per folder)")
    return datasets


def series_geometry(datasets: Sequence[Any]) -> Tuple[Any, List[Any]]:
    """The voxel grid of a single-frame series and its instances in grid order.

    Returns:
        (``highdicom.VolumeGeometry`` with spatial shape (frames, rows, columns), the datasets sorted so that
        ``sorted[i]`` is frame ``i``).
    """
    import highdicom as hd
    from highdicom.spatial import get_series_volume_positions

    first = datasets[0]
    if len(datasets) == 1:
        spacing, ordered = float(first.get("SpacingBetweenSlices", first.get("SliceThickness", 1.0))), list(datasets)
    else:
        spacing, positions = get_series_volume_positions(datasets)
        if spacing is None:
            raise BadInputError(
                f"{getattr(first, 'filename', 'series')}: the DICOM series is not a regularly spaced volume"
            )
        ordered = [datasets[positions.index(i)] for i in range(len(datasets))]
    geometry = hd.VolumeGeometry.from_attributes(
        image_position=ordered[0].ImagePositionPatient,
        image_orientation=first.ImageOrientationPatient,
        rows=int(first.Rows),
        columns=int(first.Columns),
        pixel_spacing=first.PixelSpacing,
        spacing_between_slices=spacing,
        number_of_frames=len(ordered),
        coordinate_system="PATIENT",
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
    )
    return geometry, ordered


def label_map_on_series(array: np.ndarray, affine: np.ndarray, geometry: Any) -> np.ndarray:
    """Bring an array on the label map's grid onto the source series' grid (no resampling).

    Args:
        array: (H, W, D) or (H, W, D, S) array in the geometry of ``affine``.
        affine: 4x4 voxel-to-mm affine in RAS (as MONAI/NIfTI give it).
        geometry: the series' ``VolumeGeometry`` (``series_geometry``).

    Returns:
        (frames, rows, columns) or (frames, rows, columns, S) array, frame ``i`` on source instance ``i``.

    Raises:
        RuntimeError: the two grids differ by more than axis permutations and flips.
    """
    import highdicom as hd

    spatial, channels = (
        (array, None) if array.ndim == 3 else (array, {"SegmentNumber": list(range(1, array.shape[3] + 1))})
    )
    volume = hd.Volume(
        array=spatial,
        affine=np.asarray(affine, dtype=np.float64),
        coordinate_system="PATIENT",
        frame_of_reference_uid=geometry.frame_of_reference_uid,
        from_reference_convention="RAS",
        channels=channels,
    )
    return volume.match_geometry(geometry, tol=_GEOMETRY_TOL).array


def _code(pair: Tuple[str, str]) -> Any:
    from pydicom.sr.coding import Code

    return Code(pair[0], "SCT", pair[1])


def segment_descriptions(names: Sequence[str], description: Optional[str] = None) -> List[Any]:
    """One ``highdicom.seg.SegmentDescription`` per structure name, numbered 1..N in the given order.

    Labels, codes and colors come from the task table; the algorithm is DoDNet at the bundle's version.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(
        name="DoDNet", version=_bundle_version(), family=codes.cid7162.ArtificialIntelligence, source=description
    )
    colors = {name: merged_label_colors()[mid] for mid, name in merged_label_names().items()}
    out = []
    for number, name in enumerate(names, start=1):
        sct: StructureCodes = structure_codes(name)
        out.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=_code(sct.category),
                segmented_property_type=_code(sct.type),
                algorithm_type="AUTOMATIC",
                algorithm_identification=algorithm,
                anatomic_regions=[_code(sct.region)] if sct.region is not None else None,
                display_color=hd.color.CIELabColor.from_rgb(*colors[name]),
            )
        )
    return out


def write_dicom_seg(
    path: PathLike,
    source: Sequence[Any],
    masks: np.ndarray,
    affine: np.ndarray,
    names: Sequence[str],
    description: str = "DoDNet segmentation",
) -> Path:
    """Write a BINARY DICOM SEG of ``masks`` referencing the source series, atomically.

    Args:
        path: destination ``.dcm`` file.
        source: the series' headers (``read_dicom_series``).
        masks: (H, W, D) label map with values 0..S (segment numbers, mutually exclusive) or (H, W, D, S)
            binary stack (overlaps allowed), in the geometry of ``affine``.
        affine: 4x4 RAS voxel-to-mm affine of ``masks`` (the source series' geometry as read by ITK).
        names: the S structure names, segment ``k + 1`` = ``names[k]``.
        description: series description and content description.

    Returns:
        ``path``.
    """
    import highdicom as hd

    if not names:
        raise ValueError("a DICOM SEG needs at least one segment")
    geometry, ordered = series_geometry(source)
    frames = label_map_on_series(np.asarray(masks).astype(np.uint8), affine, geometry)
    version = _bundle_version()
    seg = hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=frames,
        segmentation_type="BINARY",
        segment_descriptions=segment_descriptions(names),
        series_instance_uid=hd.UID(),
        series_number=int(ordered[0].get("SeriesNumber") or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="DoDNet MONAI bundle",
        manufacturer_model_name="DoDNet",
        software_versions=version,
        device_serial_number="0",
        content_label="DODNET",
        content_description=description[:64],
        series_description=description[:64],
        # the source's repertoire; an empty value (default repertoire, ASCII) is widened to UTF-8
        specific_character_set=ordered[0].get("SpecificCharacterSet") or "ISO_IR 192",
    )
    with atomic_output(path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return Path(path)
