"""Inference: task-aware sliding window, TTA, geometry round trips on real and synthetic CT, weights, reports."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.inference import (
    IntensityNet,
    affine_for,
    expected_liver_labels,
    phantom,
    run_workflow,
    save_checkpoint,
    tiny_dodnet,
    write_nifti,
)
from monai.inferers import SlidingWindowInferer
from monai.transforms import LoadImage

from scripts.inference.inferer import TaskSlidingWindowInferer, flip_combinations
from scripts.networks.weights import MissingWeightsError, load_network_weights, read_state_dict
from scripts.tasks import TASKS


def test_all_tasks_equal_per_task_and_one_backbone_pass_per_window():
    net = tiny_dodnet()
    calls = []
    net.backbone.register_forward_hook(lambda *_: calls.append(1))
    image = torch.randn(1, 1, 24, 16, 16)
    roi = [16, 16, 16]
    with torch.no_grad():
        everything = TaskSlidingWindowInferer(roi_size=roi, tasks="all", overlap=0.5)(image, net)
        windows = []
        SlidingWindowInferer(roi_size=roi, overlap=0.5)(image, lambda x: windows.append(1) or x)
        assert len(windows) == 2 and len(calls) == len(windows)  # one backbone pass per window for all 7 tasks
        assert everything.shape == (1, 14, 24, 16, 16) and everything.dtype == torch.float16
        for spec in TASKS:
            single = TaskSlidingWindowInferer(roi_size=roi, tasks=[spec.name], overlap=0.5)(image, net)
            assert torch.allclose(single.float(), everything[:, 2 * spec.id : 2 * spec.id + 2].float(), atol=2e-3)
        pair = TaskSlidingWindowInferer(roi_size=roi, tasks="spleen,liver", overlap=0.5)(image, net)
    expected = everything[:, [12, 13, 0, 1]].float()
    assert torch.allclose(pair.float(), expected, atol=2e-3)  # channel order follows the request
    assert ((everything >= 0) & (everything <= 1)).all()  # probabilities


def test_tta_undoes_the_flips():
    """An elementwise network is flip-equivariant: TTA changes nothing; a half-window network averages to 0.5."""
    image = torch.linspace(-1, 1, 32 * 32 * 16).reshape(1, 1, 32, 32, 16)
    stub = IntensityNet(organ_level=0.1, tumor_level=0.6, gain=8.0)
    with torch.no_grad():
        plain = TaskSlidingWindowInferer(roi_size=[32, 32, 16], tasks="liver")(image, stub)
        tta = TaskSlidingWindowInferer(roi_size=[32, 32, 16], tasks="liver", tta=True)(image, stub)
    assert stub.calls == 1 + 8
    assert torch.allclose(plain.float(), tta.float(), atol=2e-3)
    assert len(flip_combinations(3)) == 8 and flip_combinations(3)[0] == ()

    class FirstHalf(torch.nn.Module):  # organ/tumor probability ~1 on the first half of axis H, ~0 elsewhere
        def forward(self, x, task_id=None):
            out = torch.full((x.shape[0], 2, *x.shape[2:]), -30.0)
            out[:, :, : x.shape[2] // 2] = 30.0
            return out

    with torch.no_grad():
        step = TaskSlidingWindowInferer(roi_size=[32, 32, 16], tasks="liver")(image, FirstHalf())
        averaged = TaskSlidingWindowInferer(roi_size=[32, 32, 16], tasks="liver", tta=True)(image, FirstHalf())
    assert step[:, :, :16].min() > 0.99 and step[:, :, 16:].max() < 0.01
    assert torch.allclose(averaged.float(), torch.full_like(averaged.float(), 0.5), atol=1e-3)


@pytest.mark.parametrize("kind", ["ras", "lps", "oblique"])
def test_known_mask_round_trip_exact(tmp_path, kind):
    """On the network grid's spacing, the inverted label map lands on exactly the voxels of the known mask."""
    hu, affine = phantom(), affine_for((0.8, 0.8, 1.5), kind)
    src = write_nifti(tmp_path / f"ct_{kind}.nii.gz", hu, affine)
    stub = IntensityNet()
    summary = run_workflow(
        str(src), tmp_path / "out", save_checkpoint(stub, tmp_path / "stub.pt"), network_def=stub, tasks=["liver"]
    )
    assert summary["failed"] == []
    seg = nib.load(str(tmp_path / "out" / f"ct_{kind}_seg.nii.gz"))
    assert seg.shape == hu.shape and np.allclose(seg.affine, affine, atol=1e-4)
    assert seg.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(seg.dataobj), expected_liver_labels(hu))


def test_known_mask_round_trip_resampled_oblique(tmp_path):
    """Anisotropic oblique input resampled to 0.8 x 0.8 x 1.5 mm and back: same grid, same voxels up to edges."""
    hu, affine = phantom((36, 30, 12)), affine_for((1.1, 0.9, 2.5), "oblique")
    src = write_nifti(tmp_path / "aniso.nii.gz", hu, affine)
    stub = IntensityNet()
    run_workflow(str(src), tmp_path / "out", save_checkpoint(stub, tmp_path / "s.pt"), network_def=stub, tasks="liver")
    seg = nib.load(str(tmp_path / "out" / "aniso_seg.nii.gz"))
    assert seg.shape == hu.shape and np.allclose(seg.affine, affine, atol=1e-4)
    got, want = np.asarray(seg.dataobj), expected_liver_labels(hu)
    assert (got > 0).sum() and 2 * ((got > 0) & (want > 0)).sum() / ((got > 0).sum() + (want > 0).sum()) > 0.97
    np.testing.assert_array_equal(got[8:14, 10:13, 6:9], want[8:14, 10:13, 6:9])  # tumor core, away from edges


def _agreement(pred: np.ndarray, hu: np.ndarray, level: float) -> float:
    a, b = pred > 0, hu >= level
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_real_ct_round_trip(tmp_path, real_ct):
    path = real_ct / "example_ct_sm.nii.gz"
    original = nib.load(str(path))
    stub = IntensityNet()
    ckpt = save_checkpoint(stub, tmp_path / "s.pt")
    # post-processing off: the known mask (HU >= 97.5) has many components (bone, contrast), all of them kept
    summary = run_workflow(str(path), tmp_path / "out", ckpt, network_def=stub, tasks="liver", postprocess=False)
    assert summary["failed"] == [] and summary["succeeded"][0]["warnings"] == []
    seg = nib.load(str(tmp_path / "out" / "example_ct_sm_seg.nii.gz"))
    assert seg.shape == original.shape and np.allclose(seg.affine, original.affine, atol=1e-4)
    assert _agreement(np.asarray(seg.dataobj), original.get_fdata(), 97.5) > 0.9


def test_dicom_series_smaller_than_one_window(tmp_path, real_ct):
    """3 slices of 1 mm become 2 at 1.5 mm, padded to the 64-slice window; the padding must be undone."""
    series = real_ct / "dicom-3slice"
    reference = LoadImage(reader="ITKReader", image_only=True)(str(series))
    stub = IntensityNet()
    ckpt = save_checkpoint(stub, tmp_path / "s.pt")
    summary = run_workflow(str(series), tmp_path / "out", ckpt, network_def=stub, tasks="liver", postprocess=False)
    assert summary["failed"] == []
    seg = nib.load(str(tmp_path / "out" / "dicom-3slice_seg.nii.gz"))
    assert seg.shape == tuple(reference.shape) == (512, 512, 3)
    assert np.allclose(seg.affine, reference.affine.numpy(), atol=1e-3)
    got, hu = np.asarray(seg.dataobj), reference.numpy()
    # 3 slices of 1 mm through a 1.5 mm grid and back blur along z; in-plane the mask must not move by a voxel
    aligned = _agreement(got, hu, 97.5)
    assert aligned > 0.75
    for shift in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        assert aligned > _agreement(got, np.roll(hu, shift, axis=(0, 1)), 97.5) + 0.05


def test_report_volumes_are_voxel_counts_times_voxel_volume(tmp_path):
    hu, affine = phantom(), affine_for((0.8, 0.8, 1.5), "oblique")
    src = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    stub = IntensityNet()
    run_workflow(
        str(src), tmp_path / "out", save_checkpoint(stub, tmp_path / "s.pt"), network_def=stub, tasks="liver,kidney"
    )
    report = json.loads((tmp_path / "out" / "ct_report.json").read_text())
    labels = np.asarray(nib.load(str(tmp_path / "out" / "ct_seg.nii.gz")).dataobj)
    voxel_ml = 0.8 * 0.8 * 1.5 / 1000
    assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
    assert set(report["structures"]) == {"liver", "liver tumor", "kidney", "kidney tumor"}
    for name, entry in report["structures"].items():
        assert entry["voxels"] == int((labels == entry["label"]).sum())
        assert entry["volume_ml"] == pytest.approx(entry["voxels"] * voxel_ml)
    # identical masks for liver and kidney: kidney (higher precedence) wins every organ voxel, kidney tumor every tumor
    assert report["structures"]["liver"]["voxels"] == 0 and report["structures"]["kidney"]["voxels"] > 0
    burden = report["tumor_burden"]["kidney"]
    organ = report["structures"]["kidney"]["volume_ml"] + report["structures"]["kidney tumor"]["volume_ml"]
    assert burden["organ_ml"] == pytest.approx(organ)
    assert burden["burden"] == pytest.approx(report["structures"]["kidney tumor"]["volume_ml"] / organ)
    assert report["options"]["tasks"] == ["liver", "kidney"]


def test_per_structure_masks_and_probabilities_keep_overlaps(tmp_path):
    hu, affine = phantom(), affine_for((0.8, 0.8, 1.5), "lps")
    src = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    stub = IntensityNet()
    run_workflow(
        str(src),
        tmp_path / "out",
        save_checkpoint(stub, tmp_path / "s.pt"),
        network_def=stub,
        tasks="liver,spleen",
        save_masks=True,
        save_probabilities=True,
        preview=True,
    )
    out = tmp_path / "out"
    liver = nib.load(str(out / "ct_liver_mask.nii.gz"))
    spleen = nib.load(str(out / "ct_spleen_mask.nii.gz"))
    prob = nib.load(str(out / "ct_liver_tumor_prob.nii.gz"))
    for img in (liver, spleen, prob):
        assert img.shape == hu.shape and np.allclose(img.affine, affine, atol=1e-4)
    want_organ = expected_liver_labels(hu) > 0
    np.testing.assert_array_equal(np.asarray(liver.dataobj) > 0, want_organ)  # overlap with spleen survives
    np.testing.assert_array_equal(np.asarray(spleen.dataobj) > 0, want_organ)
    p = prob.get_fdata()
    assert p.max() <= 1 and p.min() >= 0 and (p[hu >= 320] > 0.99).all() and (p[hu < 0] < 0.01).all()
    assert (out / "ct_preview.png").stat().st_size > 0
    assert not list(out.glob(".tmp-*"))  # atomic writes leave no temporary files


def test_missing_weights_stop_before_any_output(tmp_path):
    src = write_nifti(tmp_path / "ct.nii.gz", phantom(), affine_for((0.8, 0.8, 1.5)))
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(Exception) as info:
        run_workflow(str(src), tmp_path / "out", missing, network_def=IntensityNet())
    root = info.value
    while root.__cause__ is not None:
        root = root.__cause__
    assert isinstance(root, MissingWeightsError)
    assert str(missing) in str(root) and "convert_official_checkpoint" in str(root) and "train" in str(root)
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists()


def test_weights_formats_and_weights_only(tmp_path):
    source, target = tiny_dodnet(seed=1), tiny_dodnet(seed=2)
    for wrap in (True, False):
        path = save_checkpoint(source, tmp_path / f"w{wrap}.pt", wrap=wrap)
        load_network_weights(target, path)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value)
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, tmp_path / "ddp.pt")
    assert set(read_state_dict(tmp_path / "ddp.pt")) == set(source.state_dict())
    torch.save({"model": source.state_dict(), "note": object()}, tmp_path / "pickle.pt")  # not weights-only
    with pytest.raises(ValueError, match="pickle.pt"):
        read_state_dict(tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_network_weights(torch.nn.Linear(2, 2), tmp_path / "wTrue.pt")


def test_body_crop_skips_air_and_writes_the_same_files_with_phase_times(tmp_path):
    """A small body in a wide field of air: the crop keeps a fraction of the grid, runs fewer windows, and the
    label map is the uncropped run's voxel for voxel, in the input's geometry; the report's phases add up."""
    hu = np.full((96, 90, 24), -1000.0, dtype=np.float32)
    hu[30:62, 28:60, 2:22] = phantom((32, 32, 20))  # body (with its own organ/tumor boxes) off-centre in air
    affine = affine_for((0.8, 0.8, 1.5), "oblique")
    src = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    labels, reports, calls = {}, {}, {}
    for crop in (True, False):
        stub = IntensityNet()
        out = tmp_path / f"out_{crop}"
        summary = run_workflow(
            str(src),
            out,
            save_checkpoint(stub, tmp_path / "s.pt"),
            network_def=stub,
            tasks="liver",
            body_crop=crop,
            patch_size=[32, 32, 16],
            precision="fp32",
        )
        calls[crop] = stub.calls
        labels[crop] = nib.load(str(out / "ct_seg.nii.gz"))
        reports[crop] = json.loads((out / "ct_report.json").read_text())
        (case,) = summary["succeeded"]
        phases = reports[crop]["seconds"]
        assert set(phases) == {"load", "preprocess", "network", "postprocess", "invert", "write", "total"}
        assert abs(phases["total"] - sum(v for k, v in phases.items() if k != "total")) < 0.01
        assert abs(phases["total"] - case["seconds"]) <= max(0.05 * case["seconds"], 0.05)
        assert case["phases"] == phases
    assert np.array_equal(np.asarray(labels[True].dataobj), np.asarray(labels[False].dataobj))
    assert np.allclose(labels[True].affine, affine, atol=1e-4) and labels[True].shape == hu.shape
    assert (np.asarray(labels[True].dataobj) > 0).sum() > 0
    crop = reports[True]["body_crop"]
    assert crop["enabled"] and 0.1 < crop["fraction"] < 0.6
    assert reports[False]["body_crop"] == {"enabled": False, "fraction": 1.0}
    assert calls[True] < calls[False]


class _OutOfMemoryOnce(IntensityNet):
    """IntensityNet whose first forward raises the error a GPU raises when it runs out of memory."""

    def forward(self, image: torch.Tensor, task_id=None) -> torch.Tensor:
        if self.calls == 0:
            self.calls += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().forward(image, task_id)


def test_resident_pipeline_writes_the_host_pipelines_files_and_falls_back_on_out_of_memory(tmp_path):
    """The GPU-resident steps (``gpu_pipeline``, run here on the CPU) and the torch connected components give the
    host pipeline's files; an out-of-memory error on the resident pipeline reruns the case on the host pipeline."""
    hu = phantom((48, 40, 20))
    hu[30:34, 8:12, 4:7] = 300.0  # a second, small tumor component: the post-processing has something to drop
    src = write_nifti(tmp_path / "ct.nii.gz", hu, affine_for((0.7, 0.9, 2.0), "oblique"))
    runs = {
        "host": dict(gpu_pipeline=False),
        "resident": dict(gpu_pipeline=True, components_backend="torch"),
        "fallback": dict(gpu_pipeline=True),
    }
    files, reports = {}, {}
    for name, overrides in runs.items():
        stub = _OutOfMemoryOnce() if name == "fallback" else IntensityNet()
        out = tmp_path / name
        summary = run_workflow(
            str(src),
            out,
            save_checkpoint(stub, tmp_path / f"{name}.pt"),
            network_def=stub,
            tasks="liver,kidney",
            save_masks=True,
            patch_size=[32, 32, 16],
            precision="fp32",
            **overrides,
        )
        assert summary["failed"] == [], summary
        files[name] = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in sorted(out.glob("*.nii.gz"))}
        reports[name] = json.loads((out / "ct_report.json").read_text())["pipeline"]
    assert len(files["host"]) == 5 and (files["host"]["ct_seg.nii.gz"] > 0).any()
    for name in ("resident", "fallback"):
        assert files[name].keys() == files["host"].keys()
        for key, array in files["host"].items():
            np.testing.assert_array_equal(files[name][key], array, err_msg=f"{name}: {key}")
    assert reports["host"] == {"device": "cpu", "resident": False, "peak_gpu_memory_mb": 0.0}
    assert reports["resident"]["resident"] is True and "fallback" not in reports["resident"]
    assert reports["fallback"]["resident"] is False
    assert reports["fallback"]["fallback"].startswith("host pipeline after OutOfMemoryError: CUDA out of memory")


def test_gpu_pipeline_auto_is_resident_only_on_cuda():
    from scripts.inference.pipeline_device import PipelineDevice, PipelineToHostd

    assert PipelineDevice("cpu").resident is False
    assert PipelineDevice("cuda").resident is True  # a device name only: nothing is allocated
    pipeline = PipelineDevice("cpu", enabled=True)
    with pipeline.on_host():
        assert pipeline.resident is False
    assert pipeline.resident is True
    with pytest.raises(ValueError, match="when must be"):
        PipelineToHostd("pred", pipeline, when="always")
