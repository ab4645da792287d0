"""``dodnet-segment``: bad inputs are reported by name, the good cases are still written, the exit code is nonzero."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
from helpers.dicom import write_series
from helpers.inference import affine_for, phantom, save_checkpoint, tiny_dodnet, write_nifti

from scripts.data.cases import BadInputError, check_input, find_cases
from scripts.inference.cli import segment_main

TINY = ["--network_def#base_channels", "8", "--network_def#norm_groups", "8", "--network_def#blocks", "[1,1,1,1,1]"]


@pytest.fixture()
def ckpt(tmp_path):
    return save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")


def make_batch(folder):
    """Two good CTs, one non-CT intensity image (warned, still segmented) and seven broken inputs."""
    folder.mkdir()
    write_nifti(folder / "good_ras.nii.gz", phantom(), affine_for((0.8, 0.8, 1.5), "ras"))
    write_nifti(folder / "good_lps.nii.gz", phantom((36, 40, 18)), affine_for((0.9, 0.9, 1.6), "lps"))
    write_nifti(folder / "mri_like.nii.gz", np.full((40, 36, 20), 300.0), affine_for((0.8, 0.8, 1.5)))
    good = (folder / "good_ras.nii.gz").read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(good[:20] + bytes(200) + good[220:])  # damaged deflate stream
    (folder / "cut.nii.gz").write_bytes(good[: len(good) // 2])  # truncated gzip
    (folder / "empty.nii.gz").write_bytes(b"")
    write_nifti(folder / "flat.nii.gz", np.zeros((40, 36), np.int16), np.eye(4))  # 2-D
    write_nifti(folder / "series.nii.gz", np.zeros((20, 20, 10, 3), np.int16), np.eye(4))  # 4-D
    raw = folder / "short.nii"
    write_nifti(raw, phantom(), np.eye(4))
    raw.write_bytes(raw.read_bytes()[:5000])  # truncated uncompressed NIfTI
    dicom = folder / "broken_series"
    dicom.mkdir()
    (dicom / "001.dcm").write_bytes(bytes(128) + b"DICM" + b"\x00garbage" * 20)
    write_nifti(folder / "all_nan.nii.gz", np.full((40, 36, 20), np.nan), affine_for((0.8, 0.8, 1.5)), np.float32)
    some_nan = phantom()
    some_nan[:3, :3, :2] = np.nan
    write_nifti(folder / "some_nan.nii.gz", some_nan, affine_for((0.8, 0.8, 1.5)), np.float32)
    write_nifti(folder / "huge_spacing.nii.gz", phantom(), affine_for((80.0, 80.0, 150.0)))  # mm typed as 0.1 mm?
    write_series(folder / "two_series", phantom((40, 36, 4)), description="arterial")
    write_series(folder / "two_series", phantom((40, 36, 4)), description="venous")
    write_series(folder / "mr_series", phantom((40, 36, 8)), modality="MR")
    (folder / "loop.nii.gz").symlink_to("loop.nii.gz")
    return folder


def test_batch_with_bad_files_writes_the_good_cases_and_exits_nonzero(tmp_path, ckpt, capsys):
    inputs = make_batch(tmp_path / "in")
    out = tmp_path / "out"
    missing = tmp_path / "no_such_scan.nii.gz"
    args = [f"{inputs},{missing}", str(out), "--ckpt", str(ckpt), "--tasks", "liver,kidney", "--preview"]
    with pytest.raises(SystemExit) as exit_info:
        segment_main(args + ["--patch_size", "[48,48,32]", "--progress", "False"] + TINY)
    assert exit_info.value.code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["succeeded"]) == [
        "good_lps",
        "good_ras",
        "mr_series",
        "mri_like",
        "some_nan",
    ]
    errors = {c["case"]: c["error"] for c in summary["failed"]}
    assert set(errors) == {"corrupt", "cut", "empty", "flat", "series", "short", "broken_series", "no_such_scan"} | {
        "all_nan",
        "huge_spacing",
        "two_series",
        "loop",
    }
    for case, error in errors.items():
        assert case in error  # every message names its file
    assert "gzip" in errors["corrupt"] and "gzip" in errors["cut"] and "empty" in errors["empty"]
    assert "2-D" in errors["flat"] and "4-D" in errors["series"] and "truncated" in errors["short"]
    assert "does not exist" in errors["no_such_scan"] and "cannot load" in errors["broken_series"]
    assert "28800 of 28800 voxels are not finite (28800 NaN, 0 inf)" in errors["all_nan"]
    assert "[0, 0]" not in errors["all_nan"]
    assert "spacing (80.0, 80.0, 150.0)" in errors["huge_spacing"] and "max_resampled_voxels" in errors["huge_spacing"]
    assert "holds 2 DICOM series" in errors["two_series"]
    assert "'arterial' (CT, 4 files)" in errors["two_series"] and "'venous' (CT, 4 files)" in errors["two_series"]
    assert "symlink loop" in errors["loop"]
    notes = {c["case"]: c["warnings"] for c in summary["succeeded"]}
    assert any("18 of 28800 voxels are not finite (18 NaN, 0 inf)" in w for w in notes["some_nan"])
    assert any("Modality is MR" in w for w in notes["mr_series"])
    for case, shape, kind, spacing in (("good_ras", (40, 36, 20), "ras", 1.5), ("good_lps", (36, 40, 18), "lps", 1.6)):
        seg = nib.load(str(out / f"{case}_seg.nii.gz"))
        source = nib.load(str(inputs / f"{case}.nii.gz"))
        assert seg.shape == shape and np.allclose(seg.affine, source.affine, atol=1e-4)
        report = json.loads((out / f"{case}_report.json").read_text())
        assert set(report["structures"]) == {"liver", "liver tumor", "kidney", "kidney tumor"}
        assert (out / f"{case}_preview.png").is_file()
    warned = [c for c in summary["succeeded"] if c["case"] == "mri_like"][0]["warnings"]
    assert warned and "mri_like" in warned[0] and "Hounsfield" in warned[0]
    printed = capsys.readouterr().out
    assert "5 case(s) segmented, 12 failed" in printed and "FAILED  corrupt" in printed
    assert not list(out.glob(".tmp-*"))


def test_missing_weights_exit_nonzero_with_instructions(tmp_path, capsys):
    src = write_nifti(tmp_path / "ct.nii.gz", phantom(), affine_for((0.8, 0.8, 1.5)))
    missing = tmp_path / "weights" / "model.pt"
    with pytest.raises(SystemExit) as exit_info:
        segment_main([str(src), str(tmp_path / "out"), "--ckpt", str(missing)] + TINY)
    assert exit_info.value.code == 2  # a usage error: the weights named do not exist
    err = capsys.readouterr().err
    assert str(missing) in err and "convert_official_checkpoint" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists()


def test_find_cases_and_early_checks(tmp_path):
    folder = make_batch(tmp_path / "in")
    (folder / "notes.txt").write_text("not an image")
    cases = find_cases(str(folder))
    names = [c["case"] for c in cases]
    assert "notes" not in names and "broken_series" in names and names == sorted(names)
    assert find_cases([str(folder / "good_ras.nii.gz")])[0]["case"] == "good_ras"
    with pytest.raises(BadInputError, match="no images found"):
        (tmp_path / "void").mkdir()
        find_cases(str(tmp_path / "void"))
    check_input(folder / "good_ras.nii.gz")
    (tmp_path / "ok.nii.gz").write_bytes(gzip.compress((folder / "short.nii").read_bytes()))
    with pytest.raises(BadInputError, match="truncated"):  # a complete gzip of a truncated NIfTI
        check_input(tmp_path / "ok.nii.gz")


def test_fast_path_options_become_inference_config_overrides(monkeypatch, tmp_path):
    import monai.bundle

    seen = {}

    class Captured(Exception):
        pass

    def capture(**kwargs):
        seen.update(kwargs)
        raise Captured

    monkeypatch.setattr(monai.bundle, "ConfigWorkflow", capture)
    from scripts.inference.cli import segment

    with pytest.raises(Captured):
        segment(str(tmp_path / "ct.nii.gz"), str(tmp_path / "out"), precision="bf16", compile_head=True)
    assert seen["precision"] == "bf16" and seen["compile_head"] is True
    seen.clear()
    with pytest.raises(Captured):
        segment(str(tmp_path / "ct.nii.gz"), str(tmp_path / "out"))
    assert "precision" not in seen and "compile_head" not in seen  # the config's defaults apply


def test_summary_names_the_gpu_pipeline_peak_memory_and_a_fallback(capsys):
    from scripts.inference.cli import _print_summary

    case = {"case": "ct", "outputs": {"label_map": "out/ct_seg.nii.gz"}, "seconds": 3.0, "phases": {"network": 2.0}}
    resident = {"device": "cuda:0", "resident": True, "peak_gpu_memory_mb": 3072.0}
    fallback = {"device": "cuda:0", "resident": False, "peak_gpu_memory_mb": 512.0, "fallback": "host pipeline after X"}
    host = {"device": "cpu", "resident": False, "peak_gpu_memory_mb": 0.0}
    summary = {"succeeded": [{**case, "pipeline": p} for p in (resident, fallback, host)], "failed": []}
    _print_summary(summary, "out")
    lines = capsys.readouterr().out.splitlines()
    gpu_lines = [line.strip() for line in lines if "peak GPU memory" in line]
    assert gpu_lines == ["cuda:0, peak GPU memory 3.00 GB", "cuda:0, peak GPU memory 0.50 GB; host pipeline after X"]
