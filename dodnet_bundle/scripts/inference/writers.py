"""Writing a case's outputs atomically: label map, DICOM SEG, per-structure masks/probabilities, report, preview.

Every file is written under a temporary name in the destination folder and renamed into place
(``os.replace``), so an interrupted run never leaves a half-written output under the final name.
A case's outputs are replaced as a unit: its old report is removed first (the files it listed are kept
in ``.<case>_report.retired.json`` until the new report, so a rerun killed midway still retires them),
its files are written, and its report is written LAST. The report is the commit marker: a case with a
report whose listed files all exist is finished (``SegmentationWriter.finished``); files without a report
are the leftovers of an interrupted case and are redone. ``remove_stale_temporaries`` deletes the temporary
files of processes that died.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter
from monai.transforms import Invertd, InvertibleTransform

from scripts.data.cases import BadInputError
from scripts.inference.dicom_seg import dicom_seg_source_problem, parse_output_type
from scripts.inference.preview import render_preview
from scripts.inference.report import case_report
from scripts.inference.timing import PhaseTimer
from scripts.tasks import merged_label_names, resolve_tasks
from scripts.utils import as_bool, atomic_output, write_json_atomic

__all__ = ["save_image_atomic", "remove_stale_temporaries", "SegmentationWriter"]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

# the temporary names of scripts.utils.atomic_output: .tmp-<pid>-<8 hex>-<final name>
_TMP_NAME = re.compile(r"^\.tmp-(\d+)-[0-9a-f]{8}-")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return True
    return True


def remove_stale_temporaries(folder: PathLike) -> List[Path]:
    """Delete the temporary files (``.tmp-<pid>-...``) that processes of this machine which no longer run
    left in ``folder`` (killed mid-write); files of running processes stay.

    Returns:
        the removed paths.
    """
    removed: List[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for f in folder.iterdir():
        match = _TMP_NAME.match(f.name)
        if match and f.is_file() and not _process_alive(int(match.group(1))):
            try:
                f.unlink()
                removed.append(f)
            except FileNotFoundError:
                pass
    if removed:
        logger.info("removed %d temporary file(s) of interrupted runs in %s", len(removed), folder)
    return removed


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

    Files: ``<case>_seg.nii.gz`` (uint8 merged label map in the input's geometry; ``output_type`` nifti or
    both), ``<case>_seg.dcm`` (DICOM SEG of a DICOM series input; ``output_type`` dicom_seg or both: one
    segment per structure found in the merged map, or per-structure masks with ``save_masks``),
    ``<case>_report.json`` (volumes, tumor burden; written last), optionally ``<case>_preview.png``,
    ``<case>_<structure>_mask.nii.gz`` (uint8) and ``<case>_<structure>_prob.nii.gz`` (float32), all in
    the input's geometry. A case with no structure found gets no SEG; its report's ``dicom_seg`` says why.

    Args:
        output_dir: destination folder (created).
        tasks: the inferred task selection (channel order of the masks).
        preprocessing: the preprocessing ``Compose`` whose inverse brings per-structure outputs back.
        preview: write the PNG preview.
        save_masks: write one binary mask per structure (overlaps survive, unlike in the merged map).
        save_probabilities: write one probability map per structure.
        output_type: "nifti" (default), "dicom_seg" or "both" (``scripts.inference.dicom_seg.OUTPUT_TYPES``).

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
        output_type: str = "nifti",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.output_type = str(output_type).strip().lower()
        self.write_nifti, self.write_seg = parse_output_type(self.output_type)
        self.tasks = resolve_tasks(tasks)
        self.preprocessing = preprocessing
        self.preview = as_bool(preview)
        self.save_masks = as_bool(save_masks)
        self.save_probabilities = as_bool(save_probabilities)
        if (self.save_masks or self.save_probabilities) and preprocessing is None:
            raise ValueError("per-structure outputs need the preprocessing transform to invert them")

    def path(self, case: str, what: str) -> Path:
        return self.output_dir / f"{case}_{what}"

    def settings(self) -> Dict[str, Any]:
        """What this writer writes (stored in each report; a finished case must match it to be skipped)."""
        return {
            "output_type": self.output_type,
            "save_masks": self.save_masks,
            "save_probabilities": self.save_probabilities,
            "preview": self.preview,
        }

    def check_case(self, input: PathLike) -> None:
        """Before the long work: refuse a case none of whose requested outputs can be written.

        Raises:
            BadInputError: DICOM SEG alone requested for an image file (a SEG needs a DICOM source).
        """
        if self.write_seg and not self.write_nifti:
            problem = dicom_seg_source_problem(input)
            if problem:
                raise BadInputError(problem)

    def finished(self, case: str, input: str, options: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
        """The report of ``case`` if it is finished with these options, else None.

        Finished: its report (the commit marker, written last) parses, names the same input, the same
        ``options`` and the same writer settings, and every file it lists exists.
        """
        try:
            report = json.loads(self.path(case, "report.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        same = (
            isinstance(report, dict)
            and report.get("input") == input
            and report.get("options") == json.loads(json.dumps(dict(options)))
            and report.get("writer") == self.settings()
        )
        outputs = report.get("outputs") if same else None
        if not isinstance(outputs, dict) or not all(Path(p).is_file() for p in outputs.values()):
            return None
        return report

    def _retired_path(self, case: str) -> Path:
        return self.output_dir / f".{case}_report.retired.json"

    def _retire(self, case: str) -> List[Path]:
        """Remove the case's report (so the case reads unfinished until its new report) and return the files
        its old report listed.

        The list is kept in ``.<case>_report.retired.json`` until the new report is written: a run killed in
        between leaves it, and the next run still removes the old outputs its options no longer write.
        """
        path, kept = self.path(case, "report.json"), self._retired_path(case)
        listed: set = set()
        for source in (kept, path):
            try:
                old = json.loads(source.read_text(encoding="utf-8")).get("outputs", {})
                listed.update(str(v) for v in old.values()) if isinstance(old, dict) else None
            except (OSError, ValueError, AttributeError):
                pass
        if path.exists():
            write_json_atomic({"outputs": {str(i): p for i, p in enumerate(sorted(listed))}}, kept)
            path.unlink()
        files = {Path(p) for p in listed}
        return [p for p in files if p.parent == self.output_dir and p.name.startswith(f"{case}_")]

    def __call__(
        self, data: Dict[str, Any], case: str, timer: Optional[PhaseTimer] = None, **info: Any
    ) -> Dict[str, Any]:
        """Write the case's files, then its report (with ``timer``'s phases, the writing included) last."""
        timer = timer if timer is not None else PhaseTimer()
        with timer.phase("write"):
            report = self._write(data, case, info)
        report["seconds"] = timer.report()
        write_json_atomic(report, self.path(case, "report.json"))  # last: the commit marker
        self._retired_path(case).unlink(missing_ok=True)
        return report

    def _write(self, data: Dict[str, Any], case: str, info: Dict[str, Any]) -> Dict[str, Any]:
        """Every output file of the case; returns its report (not yet written)."""
        retired = self._retire(case)
        label = data["pred"]
        affine = _affine(label)
        outputs: Dict[str, str] = {}
        if self.write_nifti:
            outputs["label_map"] = str(save_image_atomic(label, affine, self.path(case, "seg.nii.gz")))
        seg_masks: Optional[Dict[str, np.ndarray]] = {} if self.write_seg and self.save_masks else None
        for key, suffix, nearest, dtype, wanted in (
            ("masks", "mask", True, np.uint8, self.save_masks),
            ("prob", "prob", False, np.float32, self.save_probabilities),
        ):
            if wanted:
                keep = seg_masks if key == "masks" else None
                outputs.update(self._per_structure(data, key, case, suffix, nearest, dtype, affine, keep))
        label_array = label.detach().cpu().numpy()
        report = case_report(label_array, affine, self.tasks, case=case, **info)
        report["warnings"] = list(report.get("warnings") or [])
        if self.write_seg:
            seg_path, report["dicom_seg"] = self._dicom_seg(
                case, info.get("input"), label_array, affine, report, seg_masks
            )
            if seg_path is not None:
                outputs["dicom_seg"] = str(seg_path)
            elif report["dicom_seg"]["reason"] not in report["warnings"]:
                report["warnings"].append(report["dicom_seg"]["reason"])
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
        report["writer"] = self.settings()
        for stale in set(retired) - {Path(p) for p in report["outputs"].values()}:
            stale.unlink(missing_ok=True)  # outputs of the old options this run no longer writes
        return report

    def _dicom_seg(
        self,
        case: str,
        input: Optional[str],
        label: np.ndarray,
        affine: np.ndarray,
        report: Dict[str, Any],
        masks: Optional[Dict[str, np.ndarray]],
    ) -> Tuple[Optional[Path], Dict[str, Any]]:
        """Write ``<case>_seg.dcm``; returns (its path or None, the report's ``dicom_seg`` entry).

        Segments: the structures with voxels in the merged label map ((1, H, W, D) ``label``), or with
        ``save_masks`` the per-structure masks (``masks``: name -> (H, W, D) uint8) that have voxels.
        """
        from scripts.inference.dicom_seg import read_dicom_series, write_dicom_seg

        problem = dicom_seg_source_problem(input or "")
        if problem:
            logger.warning("%s: DICOM SEG not written: %s", case, problem)
            return None, {"written": False, "reason": problem}
        if masks is not None:
            names = [name for name, m in masks.items() if m.any()]
            array = np.stack([masks[n] for n in names], axis=-1) if names else None
            source, description = "masks", "DoDNet per-structure masks"
        else:
            present = [(s["label"], name) for name, s in report["structures"].items() if s["voxels"] > 0]
            names = [name for _, name in present]
            lut = np.zeros(max(merged_label_names()) + 1, np.uint8)  # merged id -> segment number
            for number, (mid, _) in enumerate(present, start=1):
                lut[mid] = number
            array = lut[label[0] if label.ndim == 4 else label] if names else None
            source, description = "label_map", "DoDNet segmentation"
        if not names:
            reason = "no structure found: no DICOM SEG written (a SEG needs at least one segment)"
            logger.info("%s: %s", case, reason)
            return None, {"written": False, "reason": reason, "segments": []}
        path = write_dicom_seg(self.path(case, "seg.dcm"), read_dicom_series(input), array, affine, names, description)
        return path, {"written": True, "source": source, "segments": names}

    def _per_structure(
        self,
        data: Dict[str, Any],
        key: str,
        case: str,
        suffix: str,
        nearest: bool,
        dtype: Any,
        affine: np.ndarray,
        keep: Optional[Dict[str, np.ndarray]] = None,
    ) -> Dict[str, str]:
        """Invert each structure's channel on its own (one full-size channel in memory at a time, plus the
        (H, W, D) uint8 copies put in ``keep`` for the DICOM SEG when given).

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
                out = out.detach().cpu()  # inverted on the masks' device (the GPU on a GPU-resident pipeline)
                if tuple(out.shape[1:]) != tuple(data["pred"].shape[1:]):
                    raise RuntimeError(f"{case}: inverted {name} {suffix} has shape {tuple(out.shape)}")
                path = self.path(case, f"{name.replace(' ', '_')}_{suffix}.nii.gz")
                written[f"{name} {suffix}"] = str(save_image_atomic(out, affine, path, dtype))
                if keep is not None:
                    keep[name] = out[0].detach().cpu().numpy().astype(np.uint8)
        return written
