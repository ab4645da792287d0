"""MapTaskLabelsd: each MOTS source's label values -> the (organ, tumor) target with -1 for unlabeled channels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers.tiny_mots import make_case, write_nifti
from monai.data import MetaTensor
from monai.transforms import Compose

from scripts.data.label_mapping import UNLABELED, MapTaskLabelsd
from scripts.data.transforms import ct_preprocessing
from scripts.tasks import TASKS, resolve_task

# The published mapping (original-implementation-facts.md, "Data (MOTS)"), written out independently of
# scripts/tasks.py: task -> (source values, organ channel, tumor channel) as functions of the label value.
EXPECTED = {
    "liver": ((0, 1, 2), lambda v: v >= 1, lambda v: v == 2),
    "kidney": ((0, 1, 2), lambda v: v >= 1, lambda v: v == 2),
    "hepatic_vessel": ((0, 1, 2), lambda v: v == 1, lambda v: v == 2),
    "pancreas": ((0, 1, 2), lambda v: v >= 1, lambda v: v == 2),
    "colon": ((0, 1), None, lambda v: v == 1),
    "lung": ((0, 1), None, lambda v: v == 1),
    "spleen": ((0, 1), lambda v: v == 1, None),
}
TASK_IDS = {"liver": 0, "kidney": 1, "hepatic_vessel": 2, "pancreas": 3, "colon": 4, "lung": 5, "spleen": 6}


def _label(values, name="case_001.nii.gz") -> MetaTensor:
    data = torch.tensor(values, dtype=torch.float32).reshape(1, len(values), 1, 1)
    return MetaTensor(data, meta={"filename_or_obj": name})


@pytest.mark.parametrize("task", list(EXPECTED))
def test_mapping_per_source(task):
    values, organ_fn, tumor_fn = EXPECTED[task]
    label = _label(list(values) * 2)
    out = MapTaskLabelsd()({"label": label, "task": task})
    target = out["label"]
    assert out["task_id"] == TASK_IDS[task]
    assert target.shape == (2, 2 * len(values), 1, 1)
    assert target.dtype == torch.float32
    flat = torch.tensor(list(values) * 2, dtype=torch.float32)
    for channel, fn in enumerate((organ_fn, tumor_fn)):
        if fn is None:
            assert torch.all(target[channel] == UNLABELED), f"{task} channel {channel} should be unlabeled"
        else:
            expected = fn(flat).float()
            assert torch.equal(target[channel].flatten(), expected), f"{task} channel {channel}"
    assert isinstance(target, MetaTensor) and target.meta["filename_or_obj"] == "case_001.nii.gz"


def test_task_table_matches_the_published_mapping():
    assert [t.name for t in TASKS] == list(EXPECTED)
    for spec in TASKS:
        values, organ_fn, tumor_fn = EXPECTED[spec.name]
        assert tuple(spec.source_values) == values
        assert (spec.organ_rule is None) == (organ_fn is None)
        assert (spec.tumor_rule is None) == (tumor_fn is None)


@pytest.mark.parametrize("task", [0, "0", "liver", "Liver", "hepatic vessel", 2])
def test_task_given_as_name_or_id(task):
    out = MapTaskLabelsd()({"label": _label([0, 1, 2]), "task": task})
    assert out["task_id"] == resolve_task(task).id


def test_values_outside_the_source_set_name_the_file():
    with pytest.raises(ValueError, match=r"kits_case_7\.nii\.gz.*values \{2\}.*spleen"):
        MapTaskLabelsd()({"label": _label([0, 1, 2], "kits_case_7.nii.gz"), "task": "spleen"})
    with pytest.raises(ValueError, match=r"values \{3, 7\}"):
        MapTaskLabelsd()({"label": _label([0, 3, 7]), "task": "liver"})


def test_unknown_task_and_bad_label_shape_name_the_file():
    with pytest.raises(ValueError, match=r"case_001\.nii\.gz.*unknown task 'brain'"):
        MapTaskLabelsd()({"label": _label([0, 1]), "task": "brain"})
    with pytest.raises(ValueError, match=r"case_001\.nii\.gz.*no 'task'"):
        MapTaskLabelsd()({"label": _label([0, 1])})
    two_channel = MetaTensor(torch.zeros(2, 3, 3, 3), meta={"filename_or_obj": "two.nii.gz"})
    with pytest.raises(ValueError, match=r"two\.nii\.gz.*single-channel"):
        MapTaskLabelsd()({"label": two_channel, "task": "liver"})


def test_missing_label_allowed_for_inference_items():
    out = MapTaskLabelsd(allow_missing_keys=True)({"image": torch.zeros(1, 2, 2, 2), "task": "lung"})
    assert out["task_id"] == 5 and "label" not in out


def test_after_ct_preprocessing_from_nifti(tmp_path):
    """A colon case through the shared preprocessing: organ channel all -1, tumor channel the source's 1s."""
    spec = resolve_task("colon")
    image, label = make_case(spec, shape=(24, 24, 12), seed=3)
    write_nifti(tmp_path / "img.nii.gz", image)
    write_nifti(tmp_path / "lab.nii.gz", label)
    chain = Compose(ct_preprocessing(label_keys=["label"]) + [MapTaskLabelsd()])
    out = chain({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz"), "task": "colon"})
    target = out["label"]
    assert target.shape[0] == 2 and target.shape[1:] == out["image"].shape[1:]
    assert torch.all(target[0] == UNLABELED)
    assert set(torch.unique(target[1]).tolist()) == {0.0, 1.0}
    assert int(target[1].sum()) == int((label == 1).sum())  # same spacing: resampling keeps every voxel
    assert np.isclose(float(out["image"].min()), -1.0)  # air (-1000 HU) clipped to -325 HU -> -1


def test_default_task_applies_only_to_items_without_a_task():
    mapper = MapTaskLabelsd(default_task="spleen")
    assert mapper({"label": _label([0, 1])})["task_id"] == 6
    assert mapper({"label": _label([0, 1, 2]), "task": "liver"})["task_id"] == 0
    with pytest.raises(ValueError, match="unknown task"):
        MapTaskLabelsd(default_task="brain")
