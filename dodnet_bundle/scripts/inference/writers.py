"""Writing a case's outputs atomically: label map, per-structure masks/probabilities, report, preview.

Every file is written under a temporary name in the destination folder and renamed into place
(``os.replace``), so an interrupted run never leaves a half-written output under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import Invertd, InvertibleTransform

from scripts.inference.preview import render_preview
from scripts.inference.report import case_report
from scripts.tasks import resolve_tasks
from scripts.utils import as_bool, atomic_output, write_json_atomic

__all__ = ["save_image_atomic", "SegmentationWriter"]

PathLike = Union[str, os.PathLike]


def save_image_atomic(array: torch.Tensor, affine: np.ndarray, path: PathLike, dtype: Any = np.uint8) -> Path:
    """Write a (1, H, W, D) or (H, W, D) array with its voxel-to-mm (RAS) affine as NIfTI, atomically."""
    data = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if data.ndim == 4:
        data = data[0]
    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(data, channel_dim=None)
    writer.set_metadata({"affine": np.asarray(affine), "original_affine": np.asarray(affine)}, resample=False)
    with atomic_output(path) as tmp:
        writer.write(str(tmp))
    return Path(path)


def _affine(t: torch.Tensor) -> np.ndarray:
    if not isinstance(t, MetaTensor):
        raise TypeError("expected a MetaTensor carrying its affine")
    return t.affine.detach().cpu().numpy().astype(np.float64)


class SegmentationWriter:
    """Write one case's outputs into ``output_dir`` (flat, prefixed by the case name).

    Files: ``<case>_seg.nii.gz`` (uint8 merged label map in the input's geometry), ``<case>_report.json``
    (volumes, tumor burden), optionally ``<case>_preview.png``, ``<case>_<structure>_mask.nii.gz``
    (uint8) and ``<case>_<structure>_prob.nii.gz`` (float32), all in the input's geometry.

    Args:
        output_dir: destination folder (created).
        tasks: the inferred task selection (channel order of the masks).
        preprocessing: the preprocessing ``Compose`` whose inverse brings per-structure outputs back.
        preview: write the PNG preview.
        save_masks: write one binary mask per structure (overlaps survive, unlike in the merged map).
        save_probabilities: write one probability map per structure.

    Call:
        data: the post-processed dict: ``pred`` (1, H, W, D) label map in the input geometry;
            ``image`` (1, h, w, d) preprocessed image; ``pred_grid`` (1, h, w, d) label map on the
            network grid (preview); ``masks`` (2K, h, w, d) (masks); ``prob`` (2K, h, w, d) (probabilities).
        case: case name; info: extra report entries.

    Returns:
        the report dict, with ``outputs`` listing the written files.
    """

    def __init__(
        self,
        output_dir: PathLike,
        tasks: Any = "all",
        preprocessing: Optional[InvertibleTransform] = None,
        preview: Union[bool, str] = False,
        save_masks: Union[bool, str] = False,
        save_probabilities: Union[bool, str] = False,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.tasks = resolve_tasks(tasks)
        self.preprocessing = preprocessing
        self.preview = as_bool(preview)
        self.save_masks = as_bool(save_masks)
        self.save_probabilities = as_bool(save_probabilities)
        if (self.save_masks or self.save_probabilities) and preprocessing is None:
            raise ValueError("per-structure outputs need the preprocessing transform to invert them")

    def path(self, case: str, what: str) -> Path:
        return self.output_dir / f"{case}_{what}"

    def __call__(self, data: Dict[str, Any], case: str, **info: Any) -> Dict[str, Any]:
        label = data["pred"]
        affine = _affine(label)
        outputs: Dict[str, str] = {"label_map": str(save_image_atomic(label, affine, self.path(case, "seg.nii.gz")))}
        for key, suffix, nearest, dtype, wanted in (
            ("masks", "mask", True, np.uint8, self.save_masks),
            ("prob", "prob", False, np.float32, self.save_probabilities),
        ):
            if wanted:
                outputs.update(self._per_structure(data, key, case, suffix, nearest, dtype, affine))
        report = case_report(label.detach().cpu().numpy(), affine, self.tasks, case=case, **info)
        if self.preview:
            volumes = {s["label"]: s["volume_ml"] for s in report["structures"].values()}
            grid = data["pred_grid"]
            png = render_preview(
                data["image"][0].detach().cpu().float().numpy(),
                grid[0].detach().cpu().numpy(),
                [float(s) for s in np.sqrt((_affine(grid)[:3, :3] ** 2).sum(axis=0))],
                volumes_ml=volumes,
            )
            with atomic_output(self.path(case, "preview.png")) as tmp:
                png.save(tmp, format="PNG")
            outputs["preview"] = str(self.path(case, "preview.png"))
        report["outputs"] = {**outputs, "report": str(self.path(case, "report.json"))}
        write_json_atomic(report, self.path(case, "report.json"))
        return report

    def _per_structure(
        self, data: Dict[str, Any], key: str, case: str, suffix: str, nearest: bool, dtype: Any, affine: np.ndarray
    ) -> Dict[str, str]:
        """Invert each structure's channel on its own (one full-size channel in memory at a time).

        The inverted channels share the geometry of the inverted label map, whose ``affine`` is used.
        """
        if key not in data:
            raise KeyError(f"{case}: '{key}' missing from the post-processed data (check the postprocessing config)")
        invert = Invertd(keys="x", transform=self.preprocessing, orig_keys="image", nearest_interp=nearest)
        written = {}
        for k, spec in enumerate(self.tasks):
            for name, ch, _, _ in spec.structures():
                channel = data[key][2 * k + ch : 2 * k + ch + 1]
                channel = MetaTensor(channel.as_tensor() if isinstance(channel, MetaTensor) else channel).float()
                out = invert({"image": data["image"], "x": channel})["x"]  # Invertd skips plain tensors
                if tuple(out.shape[1:]) != tuple(data["pred"].shape[1:]):
                    raise RuntimeError(f"{case}: inverted {name} {suffix} has shape {tuple(out.shape)}")
                path = self.path(case, f"{name.replace(' ', '_')}_{suffix}.nii.gz")
                written[f"{name} {suffix}"] = str(save_image_atomic(out, affine, path, dtype))
        return written
