"""Tiny partially labeled NIfTI datasets for training tests (a few KB, written in a temp folder).

Each volume is a CT-like block (soft tissue around 40 HU in air) with a bright organ box and a
darker tumor box inside it; its label uses the task's own source values (e.g. colon: tumor = 1,
spleen: organ = 1, liver: organ 1 and tumor 2), like the real MOTS sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import nibabel as nib
import numpy as np

from scripts.tasks import TASKS, TaskSpec, resolve_task

SPACING = (0.8, 0.8, 1.5)


def source_label(spec: TaskSpec, organ: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """The source dataset's label map for an organ and tumor mask (tumor inside organ)."""
    label = np.zeros(organ.shape, dtype=np.uint8)
    if spec.organ_rule is not None:
        label[organ] = 1
    if spec.tumor_rule is not None:
        value = spec.tumor_rule.equals if spec.tumor_rule.equals is not None else spec.tumor_rule.min_value
        label[tumor] = value
    return label


def make_case(spec: TaskSpec, shape: Sequence[int] = (40, 40, 20), seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """(image int16 HU, source label uint8) of one synthetic case of ``spec``."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.float32)
    body = tuple(slice(2, s - 2) for s in shape)
    image[body] = 40.0
    size = [max(4, s // 3) for s in shape]
    start = [int(rng.integers(2, max(3, s - z - 1))) for s, z in zip(shape, size)]
    organ = np.zeros(shape, dtype=bool)
    organ[tuple(slice(a, a + z) for a, z in zip(start, size))] = True
    tumor = np.zeros(shape, dtype=bool)
    tumor[tuple(slice(a + z // 4, a + z // 4 + max(2, z // 2)) for a, z in zip(start, size))] = True
    image[organ] = 150.0
    image[tumor] = -50.0
    image += rng.normal(0, 10, size=shape).astype(np.float32)
    return image.astype(np.int16), source_label(spec, organ, tumor)


def write_nifti(path: Path, array: np.ndarray, spacing: Sequence[float] = SPACING) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))


def write_tiny_mots(
    root: Path,
    train_tasks: Sequence[str] = tuple(t.name for t in TASKS),
    val_tasks: Sequence[str] = ("liver", "colon"),
    shape: Sequence[int] = (40, 40, 20),
) -> Path:
    """Write ``root/imagesTr``, ``root/labelsTr`` and ``root/datalist.json``; returns the datalist path."""
    splits: Dict[str, List[Dict[str, str]]] = {"training": [], "validation": []}
    seed = 0
    for split, tasks in (("training", train_tasks), ("validation", val_tasks)):
        for task in tasks:
            spec = resolve_task(task)
            image, label = make_case(spec, shape, seed)
            name = f"{split}_{seed:03d}_{spec.name}.nii.gz"
            write_nifti(root / "imagesTr" / name, image)
            write_nifti(root / "labelsTr" / name, label)
            splits[split].append({"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "task": spec.name})
            seed += 1
    path = root / "datalist.json"
    path.write_text(json.dumps(splits, indent=2))
    return path
