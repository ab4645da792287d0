"""dodnet-preprocess (scripts.data.preprocess) and the memory-mapped patch reader (scripts.data.patches)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.paths import BUNDLE_ROOT
from helpers.tiny_mots import make_case, write_nifti, write_tiny_mots
from monai.transforms import SpatialCrop, SpatialPad

from scripts.data.datalist import DatalistError
from scripts.data.patches import LoadPatchd, LoadPreprocessedCased, cases_per_task, load_preprocessed_datalist
from scripts.data.preprocess import PreprocessError, preprocess_datalist
from scripts.tasks import resolve_task

AIR = 12  # voxels of air around the tiny block, so the body crop is visible
# the block is 40 x 40 x 20 with a 2-voxel air rim (``make_case``): its body spans voxels 14-49 (z: 14-29); found
# on the stride-4 copy it is [13, 52) ([13, 32)), plus the margin 8: the crop box below
CROP_START, CROP_END = [5, 5, 5], [60, 60, 40]


def _write_padded_case(root: Path, name: str, task: str, seed: int) -> dict:
    image, label = make_case(resolve_task(task), (40, 40, 20), seed)
    image = np.pad(image, AIR, constant_values=-1000)
    label = np.pad(label, AIR)
    write_nifti(root / "images" / f"{name}.nii.gz", image)
    write_nifti(root / "labels" / f"{name}.nii.gz", label)
    return {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz", "task": task}


@pytest.fixture(scope="module")
def padded_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("padded")
    datalist = {
        "training": [_write_padded_case(root, f"tr{i}", t, i) for i, t in enumerate(("liver", "colon", "spleen"))],
        "validation": [_write_padded_case(root, "va0", "kidney", 9)],
    }
    (root / "datalist.json").write_text(json.dumps(datalist))
    return root


@pytest.fixture(scope="module")
def preprocessed(padded_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pre")
    path, failures = preprocess_datalist(padded_data / "datalist.json", out, workers=0, progress=False)
    assert failures == [] and path == out / "datalist.json"
    return out


def _source(padded_data: Path, name: str) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(padded_data / "labels" / f"{name}.nii.gz")).dataobj)


def test_round_trip_shape_spacing_crop_and_labels(padded_data, preprocessed):
    manifest = json.loads((preprocessed / "manifest.json").read_text())
    assert manifest["params"]["pixdim"] == [0.8, 0.8, 1.5] and manifest["params"]["hu_range"] == [-325.0, 325.0]
    assert manifest["num_cases"] == 4 and set(manifest["cases"]) == {"tr0", "tr1", "tr2", "va0"}
    datalist = json.loads((preprocessed / "datalist.json").read_text())
    assert [i["case"] for i in datalist["training"]] == ["cases/tr0", "cases/tr1", "cases/tr2"]
    assert [i["task"] for i in datalist["validation"]] == ["kidney"]
    for name in ("tr0", "tr1", "tr2"):
        record = json.loads((preprocessed / "cases" / name / "case.json").read_text())
        # pixdim equals the source spacing: no resampling; inference's body crop (stride 4, margin 8)
        assert record["resampled_shape"] == [64, 64, 44]
        assert record["crop_start"] == CROP_START and record["crop_end"] == CROP_END
        assert record["shape"] == [55, 55, 35] and np.allclose(record["spacing"], [0.8, 0.8, 1.5])
        assert manifest["cases"][name]["bytes"] == record["bytes"] > 40 * 40 * 20 * 3
        image = np.load(preprocessed / "cases" / name / "image.npy", mmap_mode="r")
        label = np.load(preprocessed / "cases" / name / "label.npy", mmap_mode="r")
        assert isinstance(image, np.memmap) and image.dtype == np.float16 and label.dtype == np.uint8
        assert image.shape == label.shape == (1, 55, 55, 35)
        assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
        source = _source(padded_data, name)[tuple(slice(a, b) for a, b in zip(CROP_START, CROP_END))]
        np.testing.assert_array_equal(label[0], source)
        affine, resampled = np.array(record["affine"]), np.array(record["resampled_affine"])
        np.testing.assert_allclose(affine[:3, 3], resampled[:3, :3] @ np.array(CROP_START) + resampled[:3, 3])
        with np.load(preprocessed / "cases" / name / "locations.npz") as npz:
            values = {int(v) for v in npz.files}
            assert values == set(np.unique(source).tolist()) - {0}
            for value in npz.files:
                coords = npz[value]
                assert coords.shape[1] == 3 and 0 < len(coords) <= 10000
                assert len(coords) == min(10000, record["voxels_per_value"][value])
                assert np.all(label[0][tuple(coords.T)] == int(value)), "a stored location outside its label value"


def test_locations_are_a_bounded_sample(padded_data, tmp_path):
    preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, max_locations=50, progress=False)
    with np.load(tmp_path / "cases" / "tr0" / "locations.npz") as npz:
        assert all(len(npz[v]) == 50 for v in npz.files)
        assert len(np.unique(npz["1"], axis=0)) == 50


def _expected_image(stored: np.ndarray, center, patch) -> np.ndarray:
    """The (1, *patch) image patch at ``center`` of the symmetrically padded stored case, read from the resampled
    grid rebuilt around it (-1 where the crop removed voxels, 0 beyond the grid)."""
    grid = np.full((64, 64, 44), -1.0, dtype=np.float32)
    grid[tuple(slice(a, b) for a, b in zip(CROP_START, CROP_END))] = stored[0]
    margin = 64
    canvas = np.pad(grid, margin)
    before = [max(p - s, 0) // 2 for p, s in zip(patch, stored.shape[1:])]
    lows = [c - p // 2 - b + a + margin for c, p, b, a in zip(center, patch, before, CROP_START)]
    return canvas[tuple(slice(lo, lo + p) for lo, p in zip(lows, patch))][None]


@pytest.mark.parametrize("patch", [(16, 16, 8), (64, 24, 40)], ids=["inside", "padded"])
def test_patch_from_memmap_equals_the_crop_of_the_whole_case(preprocessed, patch):
    """``LoadPatchd`` reads only the patch; the result equals SpatialPad + SpatialCrop of the whole stored case,
    the padding being air (-1) where the body crop removed voxels of the resampled grid and 0 beyond it."""
    items = load_preprocessed_datalist(preprocessed, "training")
    loader = LoadPatchd(patch_size=patch)
    whole = LoadPreprocessedCased()
    for seed in range(6):
        item = items[seed % len(items)]
        loader.set_random_state(seed)
        out = loader(item)
        full = whole(item)
        assert out["image"].shape == out["label"].shape == (1, *patch)
        assert out["image"].dtype == torch.float32 and out["task"] == item["task"]
        pad = SpatialPad(spatial_size=patch, mode="constant")
        crop = SpatialCrop(roi_center=loader._center, roi_size=patch)
        for key in ("image", "label"):
            expected = crop(pad(full[key])).as_tensor()
            if key == "image":  # air (-1) where the body crop removed voxels, 0 beyond the resampled grid
                expected = _expected_image(full[key].numpy(), loader._center, patch)
                if patch[0] > 55:
                    assert {-1.0, 0.0} <= set(np.unique(out[key].numpy()[:, [0, -1]]).tolist())
            torch.testing.assert_close(out[key].as_tensor(), torch.as_tensor(expected), rtol=0, atol=0)
        assert torch.allclose(out["image"].affine, crop(pad(full["image"])).affine.to(torch.float64))


def test_crop_box_is_inferences_body_crop_plus_the_labels():
    """The stored box is ``BodyCropd``'s (inference's) box; the scanner table (a separate component) is left out,
    a labeled voxel outside the body is kept; no body keeps the whole grid."""
    from monai.data import MetaTensor

    from scripts.data.body_crop import BodyCropd
    from scripts.data.preprocess import _params, crop_box

    params = _params((0.8, 0.8, 1.5), (-325.0, 325.0), margin=8, max_locations=10)
    image = torch.full((1, 96, 80, 40), -1.0)
    image[:, 20:70, 14:60, 6:33] = 0.1  # the body
    image[:, 10:86, 70:74, :] = 0.0  # the table: 0 HU, below the body, with air in between
    label = torch.zeros_like(image)
    label[:, 30:40, 20:30, 10:20] = 1
    start, end = crop_box(image, label, params)
    cropper = BodyCropd(keys="image", hu_range=(-325.0, 325.0)).cropper
    expected = [np.asarray(b).tolist() for b in cropper.compute_bounding_box(MetaTensor(image))]
    assert [start.tolist(), end.tolist()] == expected
    assert end[1] < 70 and end[0] < 86, "the table (x 10-85, y 70-73) is not part of the body"
    label[:, 2, 76, 38] = 1  # a labeled voxel far outside the body
    start, end = crop_box(image, label, params)
    assert start.tolist() == [0, *expected[0][1:]] and end.tolist() == [expected[1][0], 80, 40]
    start, end = crop_box(torch.full((1, 12, 10, 8), -1.0), torch.zeros((1, 12, 10, 8)), params)
    assert start.tolist() == [0, 0, 0] and end.tolist() == [12, 10, 8]


def test_foreground_bias_four_of_five(preprocessed):
    items = load_preprocessed_datalist(preprocessed, "training")
    loader = LoadPatchd(patch_size=(8, 8, 4)).set_random_state(0)
    hits = sum(bool(loader(items[0])["label"][0, 4, 4, 2] > 0) for _ in range(300))
    # 4/5 centred on foreground + background draws that land on it (the organ is about 1/27 of the body)
    assert 0.72 < hits / 300 < 0.92


def test_resume_skips_finished_cases_and_redoes_missing_ones(padded_data, tmp_path):
    preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, progress=False)
    cases = tmp_path / "cases"
    stamps = {p.name: (p / "case.json").stat().st_mtime_ns for p in cases.iterdir()}
    import shutil

    shutil.rmtree(cases / "tr1")
    (cases / ".tmp-123-tr1").mkdir()  # a killed run's partial folder is never read
    path, failures = preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, progress=False)
    assert failures == []
    after = {p.name: (p / "case.json").stat().st_mtime_ns for p in cases.iterdir() if not p.name.startswith(".")}
    assert set(after) == set(stamps)
    assert all(after[n] == stamps[n] for n in stamps if n != "tr1") and after["tr1"] != stamps["tr1"]
    assert len(json.loads(path.read_text())["training"]) == 3


def test_other_parameters_are_refused(padded_data, tmp_path):
    preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, progress=False)
    with pytest.raises(
        PreprocessError, match=r"other parameters: hu_range \[-325.0, 325.0\] \(asked \[-200.0, 300.0\]"
    ):
        preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, hu_range=(-200, 300), progress=False)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["params"]["version"] = 0
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PreprocessError, match="version 0"):
        preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "scripts.data.preprocess", *args]
    return subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=240, check=False)


def test_cli_skips_a_corrupt_case_names_it_and_exits_1(tmp_path):
    data = tmp_path / "data"
    write_tiny_mots(data, train_tasks=("liver", "colon", "spleen"), val_tasks=("kidney",), shape=(24, 24, 12))
    datalist = json.loads((data / "datalist.json").read_text())
    bad = data / datalist["training"][1]["image"]
    bad.write_bytes(b"\x1f\x8b not a NIfTI file")
    result = _cli(str(data / "datalist.json"), str(tmp_path / "out"), "--workers", "2", "--progress", "False")
    assert result.returncode == 1, result.stderr[-3000:]
    assert bad.name in result.stderr and "1 case(s) failed" in result.stderr
    assert "Traceback" not in result.stderr
    written = json.loads((tmp_path / "out" / "datalist.json").read_text())
    assert [i["task"] for i in written["training"]] == ["liver", "spleen"]
    assert [i["task"] for i in written["validation"]] == ["kidney"]
    usage = _cli(str(data / "datalist.json"), str(tmp_path / "out"), "--hu_range", "[300, -300]")
    assert usage.returncode == 2 and "hu_range must be [low, high]" in usage.stderr
    assert "Traceback" not in usage.stderr
    missing = _cli(str(tmp_path / "nothing.json"), str(tmp_path / "out2"))
    assert missing.returncode == 2 and "datalist not found" in missing.stderr


def test_missing_or_truncated_case_files_are_named_before_training(padded_data, tmp_path):
    preprocess_datalist(padded_data / "datalist.json", tmp_path, workers=0, progress=False)
    label = tmp_path / "cases" / "tr1" / "label.npy"
    label.write_bytes(label.read_bytes()[:-100])
    (tmp_path / "cases" / "tr2" / "image.npy").unlink()
    with pytest.raises(DatalistError) as info:
        load_preprocessed_datalist(tmp_path, "training")
    message = str(info.value)
    assert f"label {label} is missing, truncated" in message
    assert str(tmp_path / "cases" / "tr2" / "image.npy") in message and "tr0" not in message
    assert load_preprocessed_datalist(tmp_path, "validation")[0]["task"] == "kidney"


def test_cases_per_task_is_a_deterministic_spread():
    items = [{"task": "liver", "i": i} for i in range(5)] + [{"task": "colon", "i": 9}]
    capped = cases_per_task(items, 2)
    assert [(c["task"], c["i"]) for c in capped] == [("liver", 0), ("liver", 4), ("colon", 9)]
    assert cases_per_task(items, None) == items and cases_per_task(None, 3) is None
    with pytest.raises(ValueError, match="val_cases_per_task"):
        cases_per_task(items, 0)


@pytest.mark.parametrize("prob", [1.0, 0.5])
def test_fast_gaussian_smooth_is_monais_filter(prob):
    """``scripts.data.augment.RandGaussianSmoothd``: MONAI's draws (which samples, which sigmas) and its output."""
    from monai.data import MetaTensor
    from monai.transforms import RandGaussianSmoothd

    from scripts.data.augment import RandGaussianSmoothd as FastSmooth

    args = dict(keys="image", prob=prob, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.5, 1.0))
    reference, fast = RandGaussianSmoothd(**args).set_random_state(7), FastSmooth(**args).set_random_state(7)
    affine = torch.diag(torch.tensor([0.8, 0.8, 1.5, 1.0], dtype=torch.float64))
    changed = 0
    for seed in range(8):
        image = MetaTensor(torch.randn(1, 24, 20, 12, generator=torch.Generator().manual_seed(seed)), affine=affine)
        expected, out = reference({"image": image})["image"], fast({"image": image})["image"]
        assert isinstance(out, MetaTensor) and out.dtype == torch.float32 and out.shape == image.shape
        torch.testing.assert_close(out.as_tensor(), expected.as_tensor(), rtol=0, atol=1e-5)
        assert torch.equal(out.affine, affine)
        changed += int(not torch.equal(out.as_tensor(), image.as_tensor()))
    assert changed == 8 if prob == 1.0 else 0 < changed < 8
    assert (fast.rand_smooth.x, fast.rand_smooth.y, fast.rand_smooth.z) == (
        reference.rand_smooth.x,
        reference.rand_smooth.y,
        reference.rand_smooth.z,
    )


def test_train_config_on_preprocessed_patches(preprocessed):
    """train.json with ``preprocessed_dir``: published augmentations, label values checked once (by preprocessing)."""
    from monai.bundle import ConfigParser
    from monai.transforms import RandGaussianSmoothd

    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "preprocessed_dir": str(preprocessed), "patch_size": [24, 24, 12]})
    smooth = [t for t in parser.get_parsed_content("train#augmentations") if isinstance(t, RandGaussianSmoothd)]
    assert len(smooth) == 1 and smooth[0].prob == 0.2 and smooth[0].rand_smooth.sigma_x == [0.5, 1.0]
    assert parser.get_parsed_content("map_task_labels").check_values is False
    dataset = parser.get_parsed_content("train#dataset")
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["image"].shape == (1, 24, 24, 12) and sample["label"].shape == (2, 24, 24, 12)
        assert sample["image"].dtype == sample["label"].dtype == torch.float32
    parser.update({"preprocessed_dir": ""})
    assert parser.get_parsed_content("map_task_labels").check_values is True
