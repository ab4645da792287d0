"""The demo's scoring and table (the full demo run is a benchmark: benchmarks/demo_benchmark.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.demo import format_table, organ_mean_dice, score_structure_masks
from scripts.tasks import TASKS


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(path))
    return path


def test_structure_masks_are_scored_with_the_source_rules(tmp_path: Path) -> None:
    label = np.zeros((10, 10, 4), np.uint8)
    label[2:8, 2:8] = 1
    label[4:6, 4:6] = 2  # tumor inside the liver: the source's organ channel (>= 1) includes it
    organ = np.zeros_like(label)
    organ[2:8, 2:7] = 1
    tumor = (label == 2).astype(np.uint8)
    _save(tmp_path / "case_liver_mask.nii.gz", organ)
    _save(tmp_path / "case_liver_tumor_mask.nii.gz", tumor)
    _save(tmp_path / "case_spleen_mask.nii.gz", np.ones_like(label))  # another task's structure does not count
    scores = score_structure_masks(tmp_path, "case", _save(tmp_path / "lab.nii.gz", label), "liver")
    assert scores == {"liver": pytest.approx(2 * 30 * 4 / (30 * 4 + 36 * 4)), "liver tumor": pytest.approx(1.0)}
    _save(tmp_path / "case_colon_tumor_mask.nii.gz", np.zeros_like(label))
    colon = score_structure_masks(tmp_path, "case", _save(tmp_path / "l2.nii.gz", label * 0), "colon")
    assert colon == {"colon tumor": None}  # both empty: undefined
    with pytest.raises(ValueError, match="shape"):
        _save(tmp_path / "c2_colon_tumor_mask.nii.gz", np.zeros((5, 10, 4), np.uint8))
        score_structure_masks(tmp_path, "c2", tmp_path / "lab.nii.gz", "colon")
    with pytest.raises(FileNotFoundError, match="save_masks"):
        score_structure_masks(tmp_path, "missing", tmp_path / "lab.nii.gz", "liver")


def test_table_lists_every_task_and_the_organ_mean() -> None:
    structures = {}
    for i, spec in enumerate(TASKS):
        if spec.labels_organ:
            structures[spec.organ_name] = {"dice_mean": 0.8 + 0.02 * i, "cases": 2}
        if spec.labels_tumor:
            structures[spec.tumor_name] = {"dice_mean": 0.5, "cases": 2}
    summary = {"structures": structures, "table6_average": {"dice": 0.6, "dice_classes": 11}}
    organs = [0.8 + 0.02 * i for i, s in enumerate(TASKS) if s.labels_organ]
    assert organ_mean_dice(summary) == pytest.approx(np.mean(organs))
    table = format_table(summary, {"case": "x.nii.gz", "task": "liver", "dice": {"liver": 0.9}})
    for spec in TASKS:
        assert spec.display in table
    assert table.count("unlabeled") == 3  # colon and lung organs, spleen tumor
    assert f"{np.mean(organs):.3f}" in table and "over the 5 tasks with organ labels" in table
    assert "held-out inference (x.nii.gz, task liver" in table
    failed = format_table(summary, {"case": "x.nii.gz", "task": "liver", "error": "boom"})
    assert "FAILED: boom" in failed
