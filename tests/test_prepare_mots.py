"""prepare_mots: datalists from small fake MSD / LiTS / KiTS19 folder trees, split rules, clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.prepare_mots import DataPreparationError, prepare_mots, split_cases
from scripts.tasks import TASKS, task_by_name

MSD = {
    "hepatic_vessel": "Task08_HepaticVessel",
    "pancreas": "Task07_Pancreas",
    "colon": "Task10_Colon",
    "lung": "Task06_Lung",
    "spleen": "Task09_Spleen",
}
KITS_AFFINE = np.array([[0.0, 0.0, -0.78, 0.0], [0.0, -0.78, 0.0, 0.0], [-5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def _nifti(path: Path, shape=(4, 4, 3), affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4) if affine is None else affine), str(path))


def _msd(root: Path, folder: str, n: int, prefix: str) -> None:
    training = []
    for i in range(n):
        _nifti(root / folder / "imagesTr" / f"{prefix}_{i}.nii.gz")
        _nifti(root / folder / "labelsTr" / f"{prefix}_{i}.nii.gz")
        training.append({"image": f"./imagesTr/{prefix}_{i}.nii.gz", "label": f"./labelsTr/{prefix}_{i}.nii.gz"})
    (root / folder / "dataset.json").write_text(json.dumps({"training": training, "test": []}))


def _lits(root: Path, n: int) -> None:
    for i in range(n):
        batch = "Training Batch 1" if i < n // 2 else "Training Batch 2"
        _nifti(root / "LiTS" / batch / f"volume-{i}.nii")
        _nifti(root / "LiTS" / batch / f"segmentation-{i}.nii")


def _kits(root: Path, n: int, unlabeled: int = 0) -> None:
    for i in range(n + unlabeled):
        case = root / "KiTS19" / "data" / f"case_{i:05d}"
        _nifti(case / "imaging.nii.gz", shape=(3, 4, 4), affine=KITS_AFFINE)
        if i < n:
            _nifti(case / "segmentation.nii.gz", shape=(3, 4, 4), affine=KITS_AFFINE)


@pytest.fixture()
def mots_tree(tmp_path: Path) -> Path:
    """Every task with 12 cases; LiTS with its case numbers out of lexical order (volume-10 < volume-2)."""
    root = tmp_path / "mots"
    _lits(root, 12)
    _kits(root, 12, unlabeled=2)
    for i, (task, folder) in enumerate(MSD.items()):
        _msd(root, folder, 12, task)
    return root


def test_all_layouts_ratio_split(mots_tree: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="dodnet.prepare_mots"):
        out = prepare_mots(root=mots_tree, split="ratio", val_per_task=1, allow_unlabeled=True)
    datalist = json.loads(Path(out).read_text())
    assert Path(out) == mots_tree / "dodnet_datalist.json"
    for spec in TASKS:
        items = {k: [it for it in v if it["task"] == spec.name] for k, v in datalist.items()}
        n_test = round(12 * spec.test_cases / (spec.train_cases + spec.test_cases))
        assert len(items["test"]) == n_test, spec.name
        assert len(items["validation"]) == 1
        assert len(items["training"]) == 12 - n_test - 1
        for item in sum(items.values(), []):  # paths relative to the datalist folder and existing
            assert not Path(item["image"]).is_absolute()
            assert (mots_tree / item["image"]).is_file() and (mots_tree / item["label"]).is_file()
    liver_train = [Path(it["image"]).name for it in datalist["training"] if it["task"] == "liver"]
    assert liver_train[:3] == ["volume-0.nii", "volume-1.nii", "volume-2.nii"]  # numeric, not lexical order
    liver_labels = [Path(it["label"]).name for it in datalist["training"] if it["task"] == "liver"]
    assert liver_labels[:3] == ["segmentation-0.nii", "segmentation-1.nii", "segmentation-2.nii"]
    kidney = [it for split in datalist.values() for it in split if it["task"] == "kidney"]
    assert len(kidney) == 12  # the 2 image-only cases were skipped
    assert "NIfTI axis codes {'IPL': 12}" in caplog.text  # KiTS19 slices on axis i, reported


def test_original_split_counts(tmp_path: Path) -> None:
    spec = task_by_name("spleen")
    n = spec.train_cases + spec.test_cases + 3
    _msd(tmp_path, "Task09_Spleen", n, "spleen")
    out = prepare_mots(root=tmp_path, tasks="spleen", split="original", val_per_task=2, output=tmp_path / "d.json")
    datalist = json.loads(Path(out).read_text())
    assert len(datalist["training"]) == spec.train_cases - 2
    assert len(datalist["validation"]) == 2
    assert len(datalist["test"]) == spec.test_cases
    names = [Path(it["image"]).name for it in datalist["training"] + datalist["validation"] + datalist["test"]]
    assert names == [f"spleen_{i}.nii.gz" for i in range(spec.train_cases + spec.test_cases)]  # first N, in order


def test_original_split_too_few_cases_names_counts(tmp_path: Path) -> None:
    _msd(tmp_path, "Task09_Spleen", 5, "spleen")
    with pytest.raises(DataPreparationError, match=r"spleen: the original split needs 41 .* but 5 were found"):
        prepare_mots(root=tmp_path, tasks="spleen", split="original")


def test_missing_folders_are_all_listed(tmp_path: Path) -> None:
    _msd(tmp_path, "Task09_Spleen", 3, "spleen")
    with pytest.raises(DataPreparationError) as err:
        prepare_mots(root=tmp_path, split="none", val_per_task=0)
    message = str(err.value)
    for expected in ("liver: no source folder", "kidney: no source folder", "Task08_HepaticVessel", "Task10_Colon"):
        assert expected in message
    assert not (tmp_path / "dodnet_datalist.json").exists()
    with pytest.raises(DataPreparationError, match="root folder .* does not exist"):
        prepare_mots(root=tmp_path / "nope")
    with pytest.raises(DataPreparationError, match="kidney: source folder .* does not exist"):
        prepare_mots(tasks="kidney", kidney=tmp_path / "nope", output=tmp_path / "d.json")


def test_unpaired_lits_and_kits_files(tmp_path: Path) -> None:
    _lits(tmp_path, 4)
    (tmp_path / "LiTS" / "Training Batch 2" / "segmentation-3.nii").unlink()
    _nifti(tmp_path / "LiTS" / "Training Batch 2" / "segmentation-9.nii")
    _kits(tmp_path, 3, unlabeled=1)
    with pytest.raises(DataPreparationError) as err:
        prepare_mots(root=tmp_path, tasks="liver,kidney", split="none", val_per_task=0)
    message = str(err.value)
    assert "volume-3.nii: no matching segmentation-3" in message
    assert "segmentation-9.nii: no matching volume-9" in message
    assert "case_00003: imaging.nii.gz has no segmentation.nii.gz" in message


def test_msd_dataset_json_problems(tmp_path: Path) -> None:
    _msd(tmp_path, "Task07_Pancreas", 3, "pancreas")
    (tmp_path / "Task07_Pancreas" / "labelsTr" / "pancreas_1.nii.gz").unlink()
    with pytest.raises(DataPreparationError, match=r"listed file\(s\) missing: .*labelsTr/pancreas_1.nii.gz"):
        prepare_mots(root=tmp_path, tasks="pancreas", split="none", val_per_task=0)
    (tmp_path / "Task07_Pancreas" / "dataset.json").write_text("{not json")
    with pytest.raises(DataPreparationError, match="not a valid MSD dataset.json"):
        prepare_mots(root=tmp_path, tasks="pancreas", split="none", val_per_task=0)


def test_explicit_folder_and_unknown_split(tmp_path: Path) -> None:
    _msd(tmp_path / "elsewhere", "MyColon", 4, "colon")
    out = prepare_mots(
        tasks="colon",
        colon=tmp_path / "elsewhere" / "MyColon",
        split="none",
        val_per_task=1,
        output=tmp_path / "lists" / "colon.json",
    )
    datalist = json.loads(Path(out).read_text())
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1
    assert (Path(out).parent / datalist["training"][0]["image"]).resolve().is_file()
    with pytest.raises(DataPreparationError, match="unknown split rule"):
        split_cases(task_by_name("colon"), [], "random", 0)


def test_kits_slices_on_axis_i_are_moved_last_by_the_preprocessing(tmp_path: Path) -> None:
    """A KiTS19-like file ((slices, rows, cols) with its affine) comes out with the slice axis last."""
    from monai.transforms import Compose

    from scripts.data.transforms import ct_preprocessing

    data = np.zeros((3, 5, 7), np.int16)  # 3 slices of 5 x 7 pixels
    data[0] = 100  # first stored slice (most superior: affine row z = -5 * i)
    path = tmp_path / "imaging.nii.gz"
    nib.save(nib.Nifti1Image(data, KITS_AFFINE), str(path))
    steps = ct_preprocessing(pixdim=(1.0, 1.0, 5.0))[:2]  # the bundle's own load + orientation steps
    loaded = Compose(steps)({"image": str(path)})["image"]
    assert tuple(loaded.shape) == (1, 7, 5, 3)  # (C, x, y, slices)
    assert float(loaded[0, :, :, -1].mean()) == 100.0  # the superior slice ends up last (S increases)
    assert float(loaded[0, :, :, 0].mean()) == 0.0


def test_cli_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    from helpers.paths import BUNDLE_ROOT

    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from scripts.data.prepare_mots import main; "
        "sys.argv = sys.argv[1:]; main()"
    )
    bad = subprocess.run(
        [sys.executable, "-c", code, str(BUNDLE_ROOT), "--root", str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert bad.returncode == 2
    assert "dodnet-prepare-mots: error: root folder" in bad.stderr and "Traceback" not in bad.stderr
    _msd(tmp_path, "Task09_Spleen", 3, "spleen")
    good = subprocess.run(
        [sys.executable, "-c", code, str(BUNDLE_ROOT), "--root", str(tmp_path), "--tasks", "spleen", "--split", "none"],
        capture_output=True,
        text=True,
    )
    assert good.returncode == 0, good.stderr
    assert json.loads((tmp_path / "dodnet_datalist.json").read_text())["validation"][0]["task"] == "spleen"
