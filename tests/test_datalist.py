"""load_datalist: up-front validation of every item, one error listing all bad items."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers.tiny_mots import SPACING, write_nifti, write_tiny_mots

from scripts.data.datalist import DatalistError, load_datalist, read_header
from scripts.data.file_checks import nifti_truncation

SHAPE = (12, 12, 6)


def _write_pair(root: Path, name: str, label_values=(0, 1), label_shape=SHAPE, label_origin=(0.0, 0.0, 0.0)):
    image = np.zeros(SHAPE, dtype=np.int16)
    label = np.zeros(label_shape, dtype=np.uint8)
    label.flat[: len(label_values)] = label_values
    write_nifti(root / f"{name}_img.nii.gz", image)
    affine = np.diag([*SPACING, 1.0])
    affine[:3, 3] = label_origin
    nib.save(nib.Nifti1Image(label, affine), str(root / f"{name}_lab.nii.gz"))
    return {"image": f"{name}_img.nii.gz", "label": f"{name}_lab.nii.gz"}


def _datalist(root: Path, splits) -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps(splits))
    return path


def test_valid_items_get_absolute_paths_and_canonical_task_names(tmp_path):
    good = _write_pair(tmp_path, "a", (0, 1, 2))
    path = _datalist(tmp_path, {"training": [dict(good, task=0), dict(good, task="Hepatic Vessel", extra=5)]})
    items = load_datalist(dataset_dir=tmp_path)  # default datalist name in dataset_dir
    assert [i["task"] for i in items] == ["liver", "hepatic_vessel"]
    assert items[0]["image"] == str(tmp_path / "a_img.nii.gz") and items[1]["extra"] == 5
    assert load_datalist(datalist=path) == items  # relative to the datalist's folder without dataset_dir


def test_every_bad_item_is_listed_in_one_error(tmp_path):
    good = _write_pair(tmp_path, "good", (0, 1, 2))
    items = [
        dict(good, task="liver"),  # 0: fine
        {"image": "missing_img.nii.gz", "label": good["label"], "task": "liver"},  # 1: missing image
        {"image": good["image"], "label": "missing_lab.nii.gz", "task": "liver"},  # 2: missing label
        dict(_write_pair(tmp_path, "shape", label_shape=(12, 12, 5)), task="liver"),  # 3: shape mismatch
        dict(_write_pair(tmp_path, "shift", label_origin=(4.0, 0.0, 0.0)), task="liver"),  # 4: affine mismatch
        dict(good, task="brain"),  # 5: unknown task
        dict(_write_pair(tmp_path, "values", (0, 1, 2)), task="spleen"),  # 6: value 2 not a spleen value
        {"image": good["image"], "label": good["label"]},  # 7: no task
        dict(good, task="kidney"),  # 8: fine
    ]
    path = _datalist(tmp_path, {"training": items})
    with pytest.raises(DatalistError) as info:
        load_datalist(path, split="training")
    message = str(info.value)
    assert "7 of 9 items are unusable" in message
    lines = [line for line in message.splitlines() if line.startswith("  - item")]
    assert [int(line.split()[2]) for line in lines] == [1, 2, 3, 4, 5, 6, 7]
    assert "image file not found" in lines[0] and "missing_img.nii.gz" in lines[0]
    assert "label file not found" in lines[1] and "missing_lab.nii.gz" in lines[1]
    assert "image shape (12, 12, 6) differs from label shape (12, 12, 5)" in lines[2]
    assert "grids differ" in lines[3] and "origin (-4," in lines[3]
    assert "unknown task 'brain'" in lines[4]
    assert "values {2} outside the spleen task's source set" in lines[5] and "values_lab.nii.gz" in lines[5]
    assert "has no 'task'" in lines[6]


def test_corrupt_and_truncated_files_are_named(tmp_path):
    good = _write_pair(tmp_path, "good", (0, 1))
    (tmp_path / "broken_lab.nii.gz").write_bytes(b"not a nifti file at all")
    write_nifti(tmp_path / "big_img.nii.gz", np.random.default_rng(0).integers(-1000, 1000, SHAPE, np.int16))
    data = (tmp_path / "big_img.nii.gz").read_bytes()
    (tmp_path / "cut_img.nii.gz").write_bytes(data[: len(data) // 2])  # ITK would read it, zero-filling half
    items = [
        {"image": good["image"], "label": "broken_lab.nii.gz", "task": "lung"},
        {"image": "cut_img.nii.gz", "label": good["label"], "task": "lung"},
    ]
    with pytest.raises(DatalistError) as info:
        load_datalist(_datalist(tmp_path, {"training": items}))
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 2
    assert "item 0" in lines[0] and "cannot read the label header of" in lines[0] and "broken_lab.nii.gz" in lines[0]
    assert "item 1" in lines[1] and "cut_img.nii.gz is truncated" in lines[1]
    assert nifti_truncation(tmp_path / "big_img.nii.gz") is None


@pytest.mark.parametrize(
    "content, split, pattern",
    [
        ({"training": []}, "training", r"'training' list is empty"),
        ({"training": [{"image": "x"}]}, "validation", r"has no 'validation' list \(it has: \['training'\]\)"),
        ([1, 2], "training", r"has no 'training' list"),
    ],
)
def test_empty_or_missing_split(tmp_path, content, split, pattern):
    with pytest.raises(DatalistError, match=pattern):
        load_datalist(_datalist(tmp_path, content), split=split)


def test_missing_or_unreadable_datalist(tmp_path):
    with pytest.raises(DatalistError, match="datalist not found"):
        load_datalist(tmp_path / "nope.json")
    with pytest.raises(DatalistError, match="dataset_dir not found"):
        load_datalist(dataset_dir=tmp_path / "no_such_dir")
    with pytest.raises(DatalistError, match="datalist not found: .*datalist.json"):
        load_datalist(dataset_dir=tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DatalistError, match="is not readable JSON"):
        load_datalist(tmp_path / "bad.json")
    with pytest.raises(DatalistError, match="no cache_dir"):
        load_datalist()


def test_labels_optional_for_test_split(tmp_path):
    good = _write_pair(tmp_path, "t", (0, 1))
    path = _datalist(tmp_path, {"test": [{"image": good["image"], "task": "lung"}]})
    with pytest.raises(DatalistError, match="has no 'label' path"):
        load_datalist(path, split="test")
    assert load_datalist(path, split="test", require_label=False)[0]["task"] == "lung"


def test_header_is_read_without_voxels(tmp_path):
    write_nifti(tmp_path / "x.nii.gz", np.zeros((7, 8, 9), dtype=np.int16), spacing=(0.7, 0.8, 2.5))
    shape, affine = read_header(tmp_path / "x.nii.gz")
    assert shape == (7, 8, 9)
    assert np.allclose(np.abs(np.diag(affine))[:3], (0.7, 0.8, 2.5))


def test_tiny_mots_datalist_is_valid(tmp_path):
    path = write_tiny_mots(tmp_path, shape=(16, 16, 8))
    training = load_datalist(path, split="training")
    assert sorted(i["task"] for i in training) == sorted(
        ["liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen"]
    )
    assert len(load_datalist(path, split="validation")) == 2


def test_without_data_the_synthetic_default_is_generated_once(tmp_path):
    options = {"num_per_task": 1, "num_val_per_task": 1, "num_test_per_task": 0, "tasks": ["liver", "colon"]}
    training = load_datalist(split="training", cache_dir=tmp_path, synth_options=options)
    assert sorted(i["task"] for i in training) == ["colon", "liver"]
    assert all(Path(i["image"]).is_file() and Path(i["image"]).is_relative_to(tmp_path) for i in training)
    stamp = {i["image"]: Path(i["image"]).stat().st_mtime_ns for i in training}
    validation = load_datalist(split="validation", cache_dir=tmp_path, synth_options=options)
    assert len(validation) == 2
    again = load_datalist(split="training", cache_dir=tmp_path, synth_options=options)
    assert again == training and {i["image"]: Path(i["image"]).stat().st_mtime_ns for i in again} == stamp


def test_multi_member_gzip_is_not_mistaken_for_truncation(tmp_path):
    import gzip

    write_nifti(tmp_path / "whole.nii", np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE))
    raw = (tmp_path / "whole.nii").read_bytes()
    (tmp_path / "members.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    assert nifti_truncation(tmp_path / "whole.nii") is None
    assert nifti_truncation(tmp_path / "members.nii.gz") is None
    (tmp_path / "short.nii").write_bytes(raw[:-10])
    assert "is truncated" in nifti_truncation(tmp_path / "short.nii")
