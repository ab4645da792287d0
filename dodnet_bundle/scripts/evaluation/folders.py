"""Folder-vs-folder evaluation: Dice, HD95 (mm) and NSD per structure, written as CSV and a JSON summary.

Predictions are merged label maps as the bundle's inference writes them (ids of
``tasks.merged_label_names()``: 1 liver, 2 liver tumor, ..., 11 spleen); references are label maps
on the same voxel grid, with their own label values mapped to this bundle's structures by a
*label mapping* ``{structure name: [label values]}``. Each structure's mask is the union of its
values, so an organ can include its tumor and a TotalSegmentator reference can join both kidneys.

Mappings (``mapping`` for the references, ``prediction_mapping`` for the predictions) are given as
a preset name, a dict, a JSON string or the path of a JSON file:

- ``"merged"`` (default): this bundle's merged label map. Organs are evaluated as the whole organ
  channel of their task, i.e. including the task's tumor where the source dataset labels the tumor
  inside the organ (liver = ids {1, 2}, kidney = {3, 4}, pancreas = {7, 8}); vessels, tumors and
  spleen are their own id. These are the channels the paper's Table 6 scores. A merged map holds one
  id per voxel (``tasks.MERGE_PRECEDENCE``: vessels are painted over the liver, tumors over organs),
  so a liver voxel labeled as hepatic vessel is not liver here; for a whole-liver comparison pass
  e.g. ``prediction_mapping={"liver": [1, 2, 5, 6]}``.
- ``"totalsegmentator"``: TotalSegmentator v2 "total" ids: liver 5, spleen 1, kidney 2 + 3 (right +
  left), pancreas 7; other structures are not evaluated.
- ``"source:<task>"`` (e.g. ``"source:liver"`` for LiTS, ``"source:kidney"`` for KiTS19): the task's
  source-dataset labels, mapped by the task table's organ/tumor rules.

Cases pair by file name: the case id is the name without its extension (``.nii.gz``, ``.nii``,
``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) and without ``prediction_suffix`` / ``reference_suffix``.
``prediction_suffix`` defaults to ``"_seg"``: the bundle's inference writes ``<case>_seg.nii.gz``
beside other files (``<case>_<structure>_mask.nii.gz``, reports, previews), which are then ignored;
pass ``prediction_suffix=""`` for predictions named exactly like the references.
Unpaired files are an error listing all of them (before any work) unless ``allow_unpaired``.
Prediction and reference must share shape and affine (within ``affine_tolerance`` mm); a case that
cannot be read or does not match is recorded with its error and the other cases are still scored.
Metrics and the scoring of empty masks are defined in ``scripts/evaluation/metrics.py``.

Command line (from the bundle root)::

    python -m scripts.evaluation.folders PREDICTIONS REFERENCES OUTPUT_DIR [--mapping totalsegmentator]
        [--nsd_tolerance_mm 2] [--allow_unpaired] [--prediction_suffix ""]

or through the bundle config ``configs/evaluate_folders.json``::

    python -m monai.bundle run --config_file configs/evaluate_folders.json \
        --prediction_dir PREDICTIONS --reference_dir REFERENCES --mapping totalsegmentator

It writes ``OUTPUT_DIR/metrics.csv`` (one row per case x structure) and ``OUTPUT_DIR/summary.json``
(per-structure statistics and the 11-class Table 6 averages) and exits with 1 when a case failed.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
from monai.transforms import LoadImage

from scripts.data.cases import IMAGE_SUFFIXES
from scripts.evaluation.metrics import (
    DEFAULT_NSD_TOLERANCE_MM,
    TABLE6_STRUCTURES,
    spacing_from_affine,
    structure_metrics,
    structure_task,
    summarize,
    write_metrics_csv,
    write_metrics_json,
)
from scripts.tasks import TASKS, resolve_task

__all__ = [
    "merged_mapping",
    "source_mapping",
    "TOTALSEGMENTATOR_MAPPING",
    "preset_names",
    "resolve_label_mapping",
    "case_id",
    "pair_cases",
    "load_label_map",
    "check_geometry",
    "evaluate_case",
    "evaluate_folders",
]

logger = logging.getLogger(__name__)


LabelMapping = Dict[str, Tuple[int, ...]]


def merged_mapping() -> LabelMapping:
    """``{structure: merged ids}`` of this bundle's label map; organs include their task's tumor id
    where the task's organ rule covers the tumor's source values (liver, kidney, pancreas)."""
    mapping: LabelMapping = {}
    for spec in TASKS:
        tumor_values = [v for v in spec.source_values if spec.tumor_rule is not None and spec.tumor_rule.matches(v)]
        organ_covers_tumor = (
            spec.organ_rule is not None and bool(tumor_values) and all(spec.organ_rule.matches(v) for v in tumor_values)
        )
        for name, channel, merged_id, _ in spec.structures():
            if channel == 0 and organ_covers_tumor and spec.tumor_id is not None:
                mapping[name] = (merged_id, spec.tumor_id)
            else:
                mapping[name] = (merged_id,)
    return mapping


def source_mapping(task: Union[str, int]) -> LabelMapping:
    """``{structure: source label values}`` of one task's source dataset, from the task table's rules."""
    spec = resolve_task(task)
    mapping: LabelMapping = {}
    for name, channel, _, _ in spec.structures():
        rule = spec.organ_rule if channel == 0 else spec.tumor_rule
        if rule is None:
            continue
        mapping[name] = tuple(v for v in spec.source_values if v != 0 and rule.matches(v))
    return mapping


#: TotalSegmentator v2 "total" task ids of the structures this bundle segments.
TOTALSEGMENTATOR_MAPPING: LabelMapping = {"liver": (5,), "kidney": (2, 3), "pancreas": (7,), "spleen": (1,)}


def preset_names() -> List[str]:
    """Names accepted as a mapping preset."""
    return ["merged", "totalsegmentator"] + [f"source:{spec.name}" for spec in TASKS]


def _normalize_structure(name: str) -> str:
    key = " ".join(str(name).strip().lower().replace("_", " ").split())
    if key not in TABLE6_STRUCTURES:
        raise ValueError(
            f"unknown structure {name!r} in label mapping; known structures: {', '.join(TABLE6_STRUCTURES)}"
        )
    return key


def _validate_mapping(raw: Mapping[str, Any], origin: str) -> LabelMapping:
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(f"label mapping {origin} must be a non-empty {{structure: [label values]}} dict, got {raw!r}")
    mapping: LabelMapping = {}
    for name, values in raw.items():
        key = _normalize_structure(name)
        values = [values] if isinstance(values, (int, np.integer)) else values
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f"label mapping {origin}: {name!r} needs a non-empty list of label values, got {values!r}")
        ints = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(
                    f"label mapping {origin}: {name!r} has label value {v!r}; values must be integers >= 1"
                )
            ints.append(int(v))
        if key in mapping:
            raise ValueError(f"label mapping {origin} names structure {key!r} twice")
        mapping[key] = tuple(sorted(set(ints)))
    return mapping


def resolve_label_mapping(mapping: Union[None, str, Path, Mapping[str, Any]] = "merged") -> LabelMapping:
    """A label mapping from a preset name, a dict, a JSON string or a JSON file path (see the module docstring)."""
    if mapping is None:
        return merged_mapping()
    if isinstance(mapping, Mapping):
        return _validate_mapping(mapping, "(dict)")
    text = str(mapping).strip()
    key = text.lower()
    if key == "merged":
        return merged_mapping()
    if key in ("totalsegmentator", "totalsegmentator_v2", "total"):
        return dict(TOTALSEGMENTATOR_MAPPING)
    if key.startswith("source:"):
        return source_mapping(text.split(":", 1)[1])
    if text.startswith("{"):
        try:
            return _validate_mapping(json.loads(text), "(JSON string)")
        except json.JSONDecodeError as exc:
            raise ValueError(f"label mapping is not valid JSON: {exc}") from None
    path = Path(text).expanduser()
    if path.is_file():
        try:
            return _validate_mapping(json.loads(path.read_text(encoding="utf-8")), f"file {path}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"label mapping file {path} is not valid JSON: {exc}") from None
    raise ValueError(
        f"unknown label mapping {text!r}: expected a preset ({', '.join(preset_names())}), "
        "a JSON file, a JSON string or a dict {structure: [label values]}"
    )


def case_id(path: Path, suffix: str = "") -> Optional[str]:
    """The case id of a label file: its name without the extension and ``suffix``; None if not a label file."""
    name = path.name
    for ext in IMAGE_SUFFIXES:
        if name.lower().endswith(ext):
            stem = name[: -len(ext)]
            if suffix:
                if not stem.endswith(suffix) or stem == suffix:
                    return None
                stem = stem[: -len(suffix)]
            return stem
    return None


def _index_folder(folder: Path, suffix: str, what: str) -> Dict[str, Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist or is not a folder")
    index: Dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        cid = case_id(path, suffix)
        if cid is None:
            continue
        if cid in index:
            raise ValueError(f"{what} folder {folder}: case {cid!r} has two files: {index[cid].name} and {path.name}")
        index[cid] = path
    return index


def pair_cases(
    prediction_dir: Union[str, Path],
    reference_dir: Union[str, Path],
    prediction_suffix: str = "",
    reference_suffix: str = "",
) -> Tuple[List[Tuple[str, Path, Path]], List[Path], List[Path]]:
    """Pair prediction and reference files by case id.

    Returns:
        ``(pairs, unpaired_predictions, unpaired_references)``; pairs are ``(case, prediction, reference)``
        sorted by case id.
    """
    preds = _index_folder(Path(prediction_dir), prediction_suffix, "predictions")
    refs = _index_folder(Path(reference_dir), reference_suffix, "references")
    pairs = [(cid, preds[cid], refs[cid]) for cid in sorted(set(preds) & set(refs))]
    unpaired_preds = [preds[c] for c in sorted(set(preds) - set(refs))]
    unpaired_refs = [refs[c] for c in sorted(set(refs) - set(preds))]
    return pairs, unpaired_preds, unpaired_refs


def load_label_map(path: Union[str, Path]) -> Tuple[np.ndarray, np.ndarray]:
    """Read a 3-D integer label map (NIfTI, NRRD, MetaImage).

    Returns:
        ``(labels (H, W, D) in the file's integer dtype (int32 for float files), affine (4, 4) RAS float64)``.

    Raises:
        ValueError: naming the file when it cannot be read, is not 3-D or holds non-integer values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    reader = "ITKReader" if not path.name.lower().endswith((".nii", ".nii.gz")) else "NibabelReader"
    try:
        img = LoadImage(reader=reader, image_only=True, dtype=None)(str(path))
    except Exception as exc:  # readers raise many types for truncated/corrupt files
        raise ValueError(f"{path}: cannot read label map ({type(exc).__name__}: {exc})") from exc
    arr = np.asarray(img)
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise ValueError(f"{path}: expected a 3-D label map, got shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.rint(arr)):
            raise ValueError(f"{path}: label map holds non-integer values (dtype {arr.dtype})")
        arr = arr.astype(np.int32)
    affine = np.asarray(img.affine, dtype=np.float64)
    return arr, affine


def check_geometry(
    prediction: Path,
    reference: Path,
    pred_shape: Sequence[int],
    ref_shape: Sequence[int],
    pred_affine: np.ndarray,
    ref_affine: np.ndarray,
    affine_tolerance: float = 1e-3,
) -> None:
    """Raise ``ValueError`` naming both files unless shapes are equal and affines agree within ``affine_tolerance``."""
    if tuple(pred_shape) != tuple(ref_shape):
        raise ValueError(
            f"{prediction.name}: shape {tuple(pred_shape)} differs from reference {reference.name} "
            f"shape {tuple(ref_shape)}"
        )
    diff = float(np.max(np.abs(np.asarray(pred_affine) - np.asarray(ref_affine))))
    if diff > affine_tolerance:
        raise ValueError(
            f"{prediction.name}: affine differs from reference {reference.name} by up to {diff:.4g} mm "
            f"(tolerance {affine_tolerance:g}); prediction spacing {spacing_from_affine(pred_affine)}, "
            f"reference spacing {spacing_from_affine(ref_affine)}, prediction origin "
            f"{tuple(np.round(pred_affine[:3, 3], 3))}, reference origin {tuple(np.round(ref_affine[:3, 3], 3))}"
        )


def evaluate_case(
    prediction: Path,
    reference: Path,
    reference_mapping: LabelMapping,
    prediction_mapping: LabelMapping,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    affine_tolerance: float = 1e-3,
) -> List[Dict[str, Any]]:
    """Metrics of every structure of ``reference_mapping`` for one prediction/reference pair.

    Returns:
        one row per structure (keys: task, structure, dice, hd95_mm, nsd, prediction_voxels,
        reference_voxels, status).
    """
    ref_labels, ref_affine = load_label_map(reference)
    pred_labels, pred_affine = load_label_map(prediction)
    check_geometry(
        prediction, reference, pred_labels.shape, ref_labels.shape, pred_affine, ref_affine, affine_tolerance
    )
    spacing = spacing_from_affine(ref_affine)
    rows = []
    for structure, ref_values in reference_mapping.items():
        pred_mask = np.isin(pred_labels, prediction_mapping[structure])
        ref_mask = np.isin(ref_labels, ref_values)
        metrics = structure_metrics(pred_mask, ref_mask, spacing, nsd_tolerance_mm)
        rows.append({"task": structure_task(structure).name, "structure": structure, **metrics})
    return rows


def evaluate_folders(
    prediction_dir: Union[str, Path],
    reference_dir: Union[str, Path],
    output_dir: Union[str, Path],
    mapping: Union[None, str, Path, Mapping[str, Any]] = "merged",
    prediction_mapping: Union[None, str, Path, Mapping[str, Any]] = "merged",
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    both_empty: str = "exclude",
    allow_unpaired: bool = False,
    prediction_suffix: str = "_seg",
    reference_suffix: str = "",
    affine_tolerance: float = 1e-3,
    csv_name: str = "metrics.csv",
    summary_name: str = "summary.json",
    fail_on_error: bool = False,
) -> Dict[str, Any]:
    """Evaluate every prediction against its reference and write ``metrics.csv`` and ``summary.json``.

    Args:
        prediction_dir: folder of predicted label maps (merged ids unless ``prediction_mapping`` says otherwise).
        reference_dir: folder of reference label maps.
        output_dir: where the CSV and the JSON summary go (written atomically).
        mapping: reference label mapping (preset, dict, JSON string or file); its structures are evaluated.
        prediction_mapping: prediction label mapping; must cover the reference mapping's structures.
        nsd_tolerance_mm: NSD tolerance in mm (default 2 mm).
        both_empty: ``"exclude"`` or ``"count"``: how a structure absent from both enters the means.
        allow_unpaired: evaluate the paired cases and list unpaired files in the summary instead of failing.
        prediction_suffix / reference_suffix: removed from the file stem to get the case id; files without it
            are ignored (default ``"_seg"`` for predictions, as inference names them; ``""`` for none).
        affine_tolerance: largest allowed absolute difference between the two affines (mm).
        csv_name / summary_name: output file names.
        fail_on_error: after writing the outputs, raise ``RuntimeError`` listing the failed cases, if any.

    Returns:
        the summary written to ``summary.json`` (also lists failed cases with their errors).
    """
    ref_map = resolve_label_mapping(mapping)
    pred_map = resolve_label_mapping(prediction_mapping)
    missing = [s for s in ref_map if s not in pred_map]
    if missing:
        raise ValueError(f"prediction mapping has no entry for structure(s) {missing} of the reference mapping")
    if both_empty not in ("exclude", "count"):
        raise ValueError(f"both_empty must be 'exclude' or 'count', got {both_empty!r}")
    if not float(nsd_tolerance_mm) >= 0 or not np.isfinite(float(nsd_tolerance_mm)):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm!r}")

    pairs, unpaired_preds, unpaired_refs = pair_cases(
        prediction_dir, reference_dir, prediction_suffix, reference_suffix
    )
    if (unpaired_preds or unpaired_refs) and not allow_unpaired:
        lines = [f"  prediction without reference: {p.name}" for p in unpaired_preds]
        lines += [f"  reference without prediction: {p.name}" for p in unpaired_refs]
        raise ValueError(
            f"{len(unpaired_preds) + len(unpaired_refs)} unpaired file(s) between {prediction_dir} and {reference_dir} "
            "(pairing by file name; see prediction_suffix/reference_suffix, or pass allow_unpaired=True):\n"
            + "\n".join(lines)
        )
    if not pairs:
        raise ValueError(
            f"no prediction/reference pairs between {prediction_dir} and {reference_dir} (prediction_suffix "
            f"{prediction_suffix!r}, reference_suffix {reference_suffix!r}; files pair by name without these suffixes)"
        )

    rows: List[Dict[str, Any]] = []
    failed: List[Dict[str, str]] = []
    start = time.time()
    for case, pred_path, ref_path in pairs:
        try:
            case_rows = evaluate_case(pred_path, ref_path, ref_map, pred_map, nsd_tolerance_mm, affine_tolerance)
        except Exception as exc:  # one bad case must not lose the others
            message = str(exc) if isinstance(exc, (ValueError, FileNotFoundError)) else f"{type(exc).__name__}: {exc}"
            logger.error("case %s failed: %s", case, message)
            failed.append({"case": case, "prediction": pred_path.name, "reference": ref_path.name, "error": message})
            rows.append({"case": case, "status": "error", "error": message})
            continue
        rows.extend({"case": case, **r} for r in case_rows)

    output_dir = Path(output_dir)
    summary: Dict[str, Any] = {
        "cases": len(pairs),
        "cases_evaluated": len(pairs) - len(failed),
        "failed": failed,
        "unpaired": {"predictions": [p.name for p in unpaired_preds], "references": [p.name for p in unpaired_refs]},
        "nsd_tolerance_mm": float(nsd_tolerance_mm),
        "both_empty": both_empty,
        "reference_mapping": {k: list(v) for k, v in ref_map.items()},
        "prediction_mapping": {k: list(pred_map[k]) for k in ref_map},
        "seconds": round(time.time() - start, 3),
        **summarize(rows, both_empty=both_empty),
    }
    write_metrics_csv(output_dir / csv_name, rows)
    write_metrics_json(output_dir / summary_name, summary)
    if failed and fail_on_error:
        lines = "\n".join(f"  {f['case']}: {f['error']}" for f in failed)
        raise RuntimeError(f"{len(failed)} of {len(pairs)} case(s) failed (others written to {output_dir}):\n{lines}")
    return summary


def _format_table(summary: Mapping[str, Any]) -> str:
    def fmt(v: Optional[float], scale: float = 1.0, missing: str = "n/a") -> str:
        return missing if v is None else f"{v * scale:6.2f}"

    lines = [f"{'structure':<22}{'Dice %':>8}{'HD95 mm':>9}{'NSD %':>8}{'cases':>7}{'HD95 inf':>9}"]
    for name, s in summary["structures"].items():
        hd_missing = "inf" if s["hd95_infinite"] else "n/a"
        lines.append(
            f"{name:<22}{fmt(s['dice_mean'], 100):>8}{fmt(s['hd95_mm_mean'], 1.0, hd_missing):>9}"
            f"{fmt(s['nsd_mean'], 100):>8}{s['scored']:>7}{s['hd95_infinite']:>9}"
        )
    t6 = summary["table6_average"]
    lines.append(
        f"{'average (' + str(len(t6['classes'])) + ' classes)':<22}{fmt(t6['dice'], 100):>8}{fmt(t6['hd95_mm']):>9}"
        f"{fmt(t6['nsd'], 100):>8}"
    )
    return "\n".join(lines)


@functools.wraps(evaluate_folders)  # fire shows evaluate_folders' arguments and docstring
def _cli(args: List[str]) -> Optional[int]:
    from scripts.cli_errors import fire_call

    called = fire_call("dodnet-evaluate", evaluate_folders, args)
    if called is None:  # --help
        return None
    summary, output_dir = called[0], called[1]["output_dir"]
    print(_format_table(summary))
    print(f"{summary['cases_evaluated']}/{summary['cases']} case(s) evaluated; results in {output_dir}")
    for f in summary["failed"]:
        print(f"FAILED {f['case']}: {f['error']}", file=sys.stderr)
    return 1 if summary["failed"] else None


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command-line entry point (fire); exits 1 when any case failed, 2 on a usage/input error (one line; the
    traceback with ``--debug``)."""
    from scripts.cli_errors import USAGE_EXIT, run_cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    run_cli(
        "dodnet-evaluate",
        _cli,
        argv,
        extra=((ValueError, USAGE_EXIT), (FileNotFoundError, USAGE_EXIT)),
    )


if __name__ == "__main__":
    main()
