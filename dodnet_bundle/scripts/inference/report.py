"""Per-case JSON report: the volume of every structure of the written label map and tumor burden."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np

from scripts.tasks import TaskSpec, merged_label_names

__all__ = ["voxel_volume_ml", "case_report"]


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL from a 4x4 (or 3x3 linear part of a) voxel-to-mm affine."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    return float(abs(np.linalg.det(linear))) / 1000.0


def case_report(label_map: np.ndarray, affine: np.ndarray, tasks: Sequence[TaskSpec], **info: Any) -> Dict[str, Any]:
    """Volumes of the structures in a merged label map, in the geometry it is written in.

    Args:
        label_map: (H, W, D) or (1, H, W, D) integer label map with the merged ids.
        affine: its 4x4 voxel-to-mm affine (determines the voxel volume).
        tasks: the tasks that were inferred (only their structures are reported).
        info: extra entries copied into the report (case name, input path, options, warnings...).

    Returns:
        a JSON-serialisable dict: ``structures`` maps each structure name to ``label``, ``voxels`` and
        ``volume_ml`` (= voxels x voxel volume); ``tumor_burden`` maps each task with organ and tumor
        to ``tumor_ml``, ``organ_ml`` (organ including its tumor: organ + tumor label voxels) and
        ``burden`` = tumor_ml / organ_ml (None for an empty organ). Volumes are those of the merged
        map, so a structure painted over by a higher-precedence one (e.g. liver under hepatic vessel)
        loses those voxels.
    """
    labels = np.asarray(label_map)
    if labels.ndim == 4:
        labels = labels[0]
    unit = voxel_volume_ml(affine)
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=max(merged_label_names()) + 1)
    names = merged_label_names()
    structures: Dict[str, Dict[str, Any]] = {}
    burden: Dict[str, Dict[str, Optional[float]]] = {}
    for spec in tasks:
        for name, _, mid, _ in spec.structures():
            structures[name] = {"label": mid, "voxels": int(counts[mid]), "volume_ml": float(counts[mid]) * unit}
        if spec.organ_id is not None and spec.tumor_id is not None:
            tumor = float(counts[spec.tumor_id]) * unit
            organ = float(counts[spec.organ_id] + counts[spec.tumor_id]) * unit
            burden[spec.name] = {"tumor_ml": tumor, "organ_ml": organ, "burden": tumor / organ if organ > 0 else None}
    spacing = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return {
        **info,
        "shape": [int(s) for s in labels.shape],
        "spacing_mm": [float(s) for s in spacing],
        "voxel_volume_ml": unit,
        "label_names": {str(k): v for k, v in names.items()},
        "structures": structures,
        "tumor_burden": burden,
    }
