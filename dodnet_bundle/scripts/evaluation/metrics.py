"""Per-structure segmentation metrics: Dice, 95% Hausdorff distance in mm and normalized surface distance.

The one implementation shared by the folder evaluator (``scripts/evaluation/folders.py``) and the bundle's
evaluation workflow (``configs/evaluate.json`` through ``scripts.metrics_handler``). The metrics
themselves are MONAI's (``compute_dice``, ``compute_hausdorff_distance`` with ``percentile=95``,
``compute_surface_dice``); this module defines which voxels form each structure, how empty masks
are scored, and how cases are summarized.

Scoring of empty masks (a structure absent from the prediction and/or the reference):

==========================  ======  ============  =====  ===============================
prediction / reference      Dice    HD95 (mm)     NSD    status
==========================  ======  ============  =====  ===============================
both non-empty              MONAI   MONAI         MONAI  ``ok``
both empty                  1.0     NaN           NaN    ``both_empty``
prediction empty only       0.0     inf           0.0    ``prediction_empty``
reference empty only        0.0     inf           0.0    ``reference_empty``
==========================  ======  ============  =====  ===============================

``both_empty`` cases are excluded from the summary means by default (``both_empty="exclude"``): a
structure correctly left out says nothing about segmentation quality and would inflate the means;
``both_empty="count"`` counts them as Dice 1, NSD 1 and HD95 0 mm instead. Infinite HD95 values
are left out of the HD95 mean and counted in ``hd95_infinite``.

HD95 follows MONAI: surface voxels are mask voxels removed by a binary erosion, distances are
Euclidean in mm (voxel spacing from the image affine), and HD95 is the larger of the two directed
95th percentiles (prediction -> reference, reference -> prediction). NSD is the fraction of both
surfaces lying within ``nsd_tolerance_mm`` of the other surface (Nikolov et al., 2021).
"""

from __future__ import annotations

import csv
import io
import math
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from scripts.tasks import TASKS, TaskSpec, merged_label_names
from scripts.utils import write_json_atomic, write_text_atomic

__all__ = [
    "DEFAULT_NSD_TOLERANCE_MM",
    "TABLE6_STRUCTURES",
    "CSV_COLUMNS",
    "structure_task",
    "spacing_from_affine",
    "structure_metrics",
    "summarize",
    "write_metrics_csv",
    "write_metrics_json",
]

DEFAULT_NSD_TOLERANCE_MM = 2.0

#: The 11 organ/tumor classes averaged in the paper's Table 6 (merged label-map names, id order).
TABLE6_STRUCTURES: Tuple[str, ...] = tuple(name for mid, name in sorted(merged_label_names().items()) if mid != 0)

#: Columns of the per case x structure CSV written by both evaluators.
CSV_COLUMNS: Tuple[str, ...] = (
    "case",
    "task",
    "structure",
    "dice",
    "hd95_mm",
    "nsd",
    "prediction_voxels",
    "reference_voxels",
    "status",
    "error",
)

_BOTH_EMPTY_POLICIES = ("exclude", "count")


def structure_task(structure: str) -> TaskSpec:
    """The task that produces ``structure`` (a merged label-map name such as "liver tumor")."""
    for spec in TASKS:
        if structure in (name for name, _, _, _ in spec.structures()):
            return spec
    raise ValueError(f"unknown structure {structure!r}; known structures: {', '.join(TABLE6_STRUCTURES)}")


def spacing_from_affine(affine: Any) -> Tuple[float, ...]:
    """Voxel spacing in mm along each array axis: the column norms of the affine's 3x3 (or 2x2) block."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    dims = a.shape[0] - 1
    return tuple(float(s) for s in np.sqrt((a[:dims, :dims] ** 2).sum(axis=0)))


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a one-voxel margin (metrics are unchanged)."""
    union = pred | ref
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        slices.append(slice(max(int(hits[0]) - 1, 0), min(int(hits[-1]) + 2, union.shape[axis])))
    return pred[tuple(slices)], ref[tuple(slices)]


def structure_metrics(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> Dict[str, Any]:
    """Dice, HD95 (mm) and NSD of one structure.

    Args:
        pred: predicted binary mask (H, W, D) (or (H, W)), any dtype; nonzero is foreground.
        ref: reference binary mask of the same shape on the same grid.
        spacing: voxel size in mm along each axis of the masks.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        ``{"dice", "hd95_mm", "nsd", "prediction_voxels", "reference_voxels", "status"}``, scored as in
        the module docstring for empty masks.
    """
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"prediction mask shape {pred.shape} differs from reference mask shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-D mask")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    out: Dict[str, Any] = {"prediction_voxels": n_pred, "reference_voxels": n_ref}
    if n_pred == 0 and n_ref == 0:
        return {**out, "dice": 1.0, "hd95_mm": math.nan, "nsd": math.nan, "status": "both_empty"}
    if n_pred == 0 or n_ref == 0:
        status = "prediction_empty" if n_pred == 0 else "reference_empty"
        return {**out, "dice": 0.0, "hd95_mm": math.inf, "nsd": 0.0, "status": status}

    pred, ref = _crop_to_union(pred, ref)
    y_pred = torch.from_numpy(np.ascontiguousarray(pred))[None, None].float()
    y = torch.from_numpy(np.ascontiguousarray(ref))[None, None].float()
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about a deprecated argument it passes to itself internally
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=sp)
        nsd = compute_surface_dice(y_pred, y, [float(nsd_tolerance_mm)], include_background=True, spacing=sp)
    return {
        **out,
        "dice": float(dice[0, 0]),
        "hd95_mm": float(hd95[0, 0]),
        "nsd": float(nsd[0, 0]),
        "status": "ok",
    }


def _finite_stats(values: List[float]) -> Dict[str, Optional[float]]:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        return {"mean": None, "std": None, "median": None}
    return {"mean": float(arr.mean()), "std": float(arr.std()), "median": float(np.median(arr))}


def summarize(rows: Iterable[Mapping[str, Any]], both_empty: str = "exclude") -> Dict[str, Any]:
    """Per-structure means and the paper's 11-class (Table 6) averages from per case x structure rows.

    Args:
        rows: dicts with at least ``structure``, ``dice``, ``hd95_mm``, ``nsd``, ``status`` (rows with
            status ``error`` are skipped).
        both_empty: ``"exclude"`` leaves both-empty rows out of the means; ``"count"`` scores them as
            Dice 1, NSD 1, HD95 0 mm.

    Returns:
        ``{"structures": {name: {...}}, "table6_average": {...}}``; absent values are None (JSON null).
        ``table6_average`` averages the per-structure means over the Table 6 classes that have one,
        lists them in ``classes`` and sets ``complete`` when all 11 are present.
    """
    if both_empty not in _BOTH_EMPTY_POLICIES:
        raise ValueError(f"both_empty must be one of {_BOTH_EMPTY_POLICIES}, got {both_empty!r}")
    per: Dict[str, Dict[str, Any]] = {}
    for row in rows:
        if row.get("status") == "error" or not row.get("structure"):
            continue
        acc = per.setdefault(
            row["structure"], {"dice": [], "hd95_mm": [], "nsd": [], "cases": 0, "both_empty": 0, "hd95_infinite": 0}
        )
        acc["cases"] += 1
        if row["status"] == "both_empty":
            acc["both_empty"] += 1
            if both_empty == "exclude":
                continue
            acc["dice"].append(1.0)
            acc["nsd"].append(1.0)
            acc["hd95_mm"].append(0.0)
            continue
        acc["dice"].append(float(row["dice"]))
        acc["nsd"].append(float(row["nsd"]))
        hd = float(row["hd95_mm"])
        if math.isfinite(hd):
            acc["hd95_mm"].append(hd)
        else:
            acc["hd95_infinite"] += 1

    structures: Dict[str, Any] = {}
    order = [s for s in TABLE6_STRUCTURES if s in per] + sorted(s for s in per if s not in TABLE6_STRUCTURES)
    for name in order:
        acc = per[name]
        entry: Dict[str, Any] = {"cases": acc["cases"], "scored": len(acc["dice"]), "both_empty": acc["both_empty"]}
        for metric in ("dice", "hd95_mm", "nsd"):
            for stat, value in _finite_stats(acc[metric]).items():
                entry[f"{metric}_{stat}"] = value
        entry["hd95_infinite"] = acc["hd95_infinite"]
        structures[name] = entry

    table6: Dict[str, Any] = {}
    for metric in ("dice", "hd95_mm", "nsd"):
        means = [structures[s][f"{metric}_mean"] for s in TABLE6_STRUCTURES if s in structures]
        means = [m for m in means if m is not None]
        table6[metric] = float(np.mean(means)) if means else None
        table6[f"{metric}_classes"] = len(means)
    present = [s for s in TABLE6_STRUCTURES if s in structures and structures[s]["dice_mean"] is not None]
    table6["classes"] = present
    table6["complete"] = len(present) == len(TABLE6_STRUCTURES)
    return {"structures": structures, "table6_average": table6}


def _json_safe(obj: Any) -> Any:
    """NaN and infinities become None (strict JSON); containers are converted recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _json_safe(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.6g}"
    return "" if value is None else value


def write_metrics_csv(path: Path, rows: Iterable[Mapping[str, Any]], columns: Sequence[str] = CSV_COLUMNS) -> None:
    """Write metric rows as CSV (NaN as ``nan``, infinity as ``inf``) to ``path``, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    write_text_atomic(buf.getvalue(), path)


def write_metrics_json(path: Path, obj: Any) -> None:
    """Write a metrics summary as strict JSON (NaN/inf as null) to ``path``, atomically."""
    write_json_atomic(_json_safe(obj), path, allow_nan=False)
