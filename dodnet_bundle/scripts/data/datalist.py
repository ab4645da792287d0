"""Load and validate a DoDNet datalist before any training starts.

A datalist is a JSON file with one list of items per split (``"training"``, ``"validation"``,
``"test"``); each item is ``{"image": path, "label": path, "task": name or id}`` with paths
absolute or relative to the dataset folder. ``load_datalist`` checks every item up front (files
exist and are complete, image and label grids agree, the task is known, the label values belong
to the task's source set) and raises one ``DatalistError`` listing every bad item, so a typo in item 731 is
found in seconds rather than hours into training. With no dataset folder and no datalist it
generates (once) and uses the synthetic MOTS-synth data of ``scripts.data.synth``.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np

from scripts.data.file_checks import nifti_truncation
from scripts.tasks import TaskSpec, resolve_task

__all__ = ["DatalistError", "load_datalist", "read_header", "DEFAULT_DATALIST_NAME"]

PathLike = Union[str, os.PathLike]

DEFAULT_DATALIST_NAME = "datalist.json"
"""File looked for in ``dataset_dir`` when no datalist is given."""

_AFFINE_ATOL_MM = 1e-2
_AFFINE_RTOL = 1e-4


class DatalistError(ValueError):
    """A datalist that cannot be used; the message lists every problem found."""


def _blank(value: Optional[PathLike]) -> bool:
    return value is None or str(value).strip() == ""


def _itk() -> Any:
    """The ``itk`` module with the parts used here loaded (ITK's lazy loading is not thread-safe)."""
    import itk

    for name in ("ImageIOFactory", "CommonEnums", "imread", "GetArrayViewFromImage"):
        getattr(itk, name)
    return itk


def read_header(path: Path) -> Tuple[Tuple[int, ...], np.ndarray]:
    """Grid of an image file without reading its voxels (ITK, as the training loader).

    Returns:
        ``(shape, affine)``: the spatial size in file order and the 4x4 index-to-physical (LPS, mm)
        matrix built from spacing, direction and origin.
    """
    itk = _itk()
    io = itk.ImageIOFactory.CreateImageIO(str(path), itk.CommonEnums.IOFileMode_ReadMode)
    if io is None:
        raise ValueError("no ITK reader recognises this file format")
    io.SetFileName(str(path))
    io.ReadImageInformation()
    ndim = io.GetNumberOfDimensions()
    shape = tuple(int(io.GetDimensions(i)) for i in range(ndim))
    direction = np.array([[io.GetDirection(j)[i] for j in range(ndim)] for i in range(ndim)], dtype=float)
    spacing = np.array([io.GetSpacing(i) for i in range(ndim)], dtype=float)
    origin = np.array([io.GetOrigin(i) for i in range(ndim)], dtype=float)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = direction * spacing[None, :]
    affine[:ndim, ndim] = origin
    return shape, affine


def _grid(affine: np.ndarray) -> str:
    """Spacing, origin and direction of a 4x4 affine, on one line."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / np.where(spacing > 0, spacing, 1.0)[None, :]
    return f"spacing {_fmt(spacing)} origin {_fmt(affine[:3, 3])} direction {_fmt(direction)}"


def _fmt(values: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in np.ravel(values)) + ")"


def _label_values(path: Path) -> np.ndarray:
    itk = _itk()
    return np.unique(itk.GetArrayViewFromImage(itk.imread(str(path))))


def _resolve_path(value: Any, base: Path) -> Path:
    path = Path(os.path.expanduser(str(value)))
    return path if path.is_absolute() else base / path


def _check_item(
    item: Any, base: Path, require_label: bool, check_values: bool
) -> Tuple[Optional[Dict[str, Any]], List[str]]:
    """Validate one item; returns the item with absolute paths and canonical task name, and its problems."""
    if not isinstance(item, dict):
        return None, [f"is a {type(item).__name__}, expected an object with image, label and task"]
    problems: List[str] = []
    out: Dict[str, Any] = dict(item)
    spec: Optional[TaskSpec] = None
    if "task" not in item:
        problems.append("has no 'task' (a task name such as 'liver' or an id 0-6)")
    else:
        try:
            spec = resolve_task(item["task"])
            out["task"] = spec.name
        except ValueError as err:
            problems.append(str(err))
    paths: Dict[str, Path] = {}
    headers: Dict[str, Tuple[Tuple[int, ...], np.ndarray]] = {}
    for key in ("image", "label"):
        if key not in item or _blank(item[key]):
            if key == "image" or require_label:
                problems.append(f"has no {key!r} path")
            continue
        path = _resolve_path(item[key], base)
        out[key] = str(path)
        if not path.exists():
            problems.append(f"{key} file not found: {path}")
            continue
        if path.is_dir():
            paths[key] = path
            continue
        try:
            headers[key] = read_header(path)
            truncation = nifti_truncation(path)
        except Exception as err:  # a corrupt or unreadable header
            problems.append(f"cannot read the {key} header of {path}: {err}")
            continue
        if truncation:
            problems.append(truncation)
        else:
            paths[key] = path
    if len(headers) == 2:
        (img_shape, img_affine), (lab_shape, lab_affine) = headers["image"], headers["label"]
        if img_shape != lab_shape:
            problems.append(f"image shape {img_shape} differs from label shape {lab_shape}")
        elif not np.allclose(img_affine, lab_affine, rtol=_AFFINE_RTOL, atol=_AFFINE_ATOL_MM):
            problems.append(f"image and label grids differ: image {_grid(img_affine)}, label {_grid(lab_affine)}")
    if check_values and spec is not None and "label" in paths and not paths["label"].is_dir() and not problems:
        try:
            values = _label_values(paths["label"])
        except Exception as err:
            problems.append(f"cannot read label {paths['label']}: {err}")
        else:
            bad = sorted(set(values.tolist()) - set(spec.source_values))
            if bad:
                shown = ", ".join(f"{v:g}" for v in bad[:10]) + (" ..." if len(bad) > 10 else "")
                problems.append(
                    f"label {paths['label']} has values {{{shown}}} outside the {spec.name} task's source set "
                    f"{set(spec.source_values)} ({spec.source})"
                )
    return out, problems


def _describe(index: int, item: Any) -> str:
    if isinstance(item, dict):
        return f"item {index} (image={item.get('image')!r}, task={item.get('task')!r})"
    return f"item {index}"


def load_datalist(
    datalist: Optional[PathLike] = None,
    dataset_dir: Optional[PathLike] = None,
    split: str = "training",
    cache_dir: Optional[PathLike] = None,
    require_label: bool = True,
    check_values: bool = True,
    num_workers: int = 2,
    synth_options: Optional[Dict[str, Any]] = None,
) -> List[Dict[str, Any]]:
    """Read one split of a datalist and validate all its items; raise one error listing every bad item.

    Where the data comes from:

    - ``dataset_dir`` empty and ``datalist`` empty: the synthetic MOTS-synth data, generated once into
      ``cache_dir`` by ``scripts.data.synth.ensure_mots_synth`` (paths relative to its datalist).
    - ``dataset_dir`` given: ``datalist`` (default ``<dataset_dir>/datalist.json``); relative item
      paths are relative to ``dataset_dir``.
    - only ``datalist`` given: relative item paths are relative to the datalist's folder.

    Args:
        datalist: JSON file with a list of items per split.
        dataset_dir: folder the item paths are relative to.
        split: the key to read (``"training"``, ``"validation"``, ``"test"``).
        cache_dir: where MOTS-synth is generated when no data is given.
        require_label: items must have a label (False for inference-only lists).
        check_values: read every label and check its values against the task's source set.
        num_workers: threads reading headers and labels.
        synth_options: keyword arguments of ``ensure_mots_synth`` (e.g. ``num_per_task``, ``seed``).

    Returns:
        the items as dicts with absolute ``image``/``label`` paths and the canonical ``task`` name
        (other keys are kept).

    Raises:
        DatalistError: missing/unreadable datalist, missing split, empty split, or bad items (all listed).
    """
    if _blank(dataset_dir) and _blank(datalist):
        if _blank(cache_dir):
            raise DatalistError("no dataset_dir and no datalist given, and no cache_dir to generate MOTS-synth into")
        from scripts.data.synth import ensure_mots_synth

        datalist_path = Path(ensure_mots_synth(str(cache_dir), **(synth_options or {})))
        base = datalist_path.parent
    elif _blank(dataset_dir):
        datalist_path = Path(os.path.expanduser(str(datalist)))
        base = datalist_path.parent
    else:
        base = Path(os.path.expanduser(str(dataset_dir)))
        if not base.is_dir():
            raise DatalistError(f"dataset_dir not found: {base}")
        datalist_path = base / DEFAULT_DATALIST_NAME if _blank(datalist) else Path(os.path.expanduser(str(datalist)))
    if not datalist_path.is_file():
        raise DatalistError(f"datalist not found: {datalist_path}")
    try:
        content = json.loads(datalist_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatalistError(f"datalist {datalist_path} is not readable JSON: {err}") from None
    if not isinstance(content, dict) or split not in content:
        keys = sorted(content) if isinstance(content, dict) else []
        raise DatalistError(f"datalist {datalist_path} has no {split!r} list (it has: {keys or 'nothing'})")
    items = content[split]
    if not isinstance(items, list) or not items:
        raise DatalistError(f"datalist {datalist_path}: the {split!r} list is empty (or not a list)")

    # absolute before the reader threads start: ITK's lazy module loading changes the process's working
    # directory for a moment (itk.support.base.LibraryLoader), so a relative path checked in one thread while
    # another loads an ITK module is "not found" (a cold MOTS-synth cache with a relative bundle_root)
    base = Path(os.path.abspath(base))

    def check(item: Any) -> Tuple[Optional[Dict[str, Any]], List[str]]:
        return _check_item(item, base, require_label, check_values)

    _itk()
    with ThreadPoolExecutor(max_workers=max(1, int(num_workers))) as pool:
        results = list(pool.map(check, items))
    bad: List[str] = []
    for index, (item, problems) in enumerate(results):
        for problem in problems:
            bad.append(f"  - {_describe(index, items[index])}: {problem}")
    if bad:
        count = sum(1 for _, problems in results if problems)
        raise DatalistError(
            f"datalist {datalist_path}, split {split!r}: {count} of {len(items)} items are unusable:\n" + "\n".join(bad)
        )
    return [item for item, _ in results if item is not None]
