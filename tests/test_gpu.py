"""GPU paths: stitching on the GPU, the GPU-resident inference pipeline, autocast precisions and the compiled heads.

CPU-only machines (CI) skip this module with the reason; ``benchmarks/gpu.sh`` runs it on a GPU before the
benchmark. The same checks on CPU live in test_inference.py and test_acceleration.py.
"""

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

from scripts.inference.components import label_components, label_components_torch
from scripts.inference.inferer import TaskSlidingWindowInferer
from scripts.networks.acceleration import compile_dynamic_heads
from scripts.networks.fused_head import fused_head_status

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu.sh runs these tests on one)"
)
ROI = (32, 32, 16)


def test_gpu_stitching_matches_cpu_stitching_and_falls_back_above_the_threshold():
    net = tiny_dodnet().cuda()
    image = torch.rand(1, 1, 70, 60, 40) * 2 - 1  # on the CPU, as the inference config passes it
    common = {"roi_size": ROI, "sw_device": "cuda", "stitch_dtype": "float32", "overlap": 0.5}
    with torch.no_grad():
        on_gpu = TaskSlidingWindowInferer(**common)(image, net)
        on_cpu = TaskSlidingWindowInferer(**common, device="cpu")(image, net)
        buffered = TaskSlidingWindowInferer(**common, cpu_thresh=1000)(image, net)  # above it: buffered to the CPU
    assert on_gpu.device.type == "cuda" and on_cpu.device.type == "cpu" and buffered.device.type == "cpu"
    assert on_gpu.shape == (1, 14, 70, 60, 40)
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-5, rtol=0)
    torch.testing.assert_close(buffered, on_cpu, atol=1e-5, rtol=0)


def test_gpu_resident_pipeline_writes_the_cpu_results(tmp_path, monkeypatch):
    """CUDA with the GPU-resident pipeline (the default there) and with the host pipeline write the CPU run's
    files; the resident run reports its peak GPU memory."""
    try:
        import itk  # noqa: F401
    except ImportError:  # GPU images often lack ITK (large wheels): the reader is not what is tested here
        from monai.transforms import LoadImaged

        import scripts.data.transforms

        monkeypatch.setattr(
            scripts.data.transforms, "LoadImaged", lambda *a, **k: LoadImaged(*a, **{**k, "reader": "NibabelReader"})
        )
    hu, affine = phantom(), affine_for((0.8, 0.8, 1.5), "lps")
    src = write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    stub = IntensityNet()
    ckpt = save_checkpoint(stub, tmp_path / "s.pt")
    outputs, pipelines = {}, {}
    for run, device, resident in (("cuda", "cuda", "auto"), ("cuda_host", "cuda", False), ("cpu", "cpu", "auto")):
        out = tmp_path / run
        summary = run_workflow(
            str(src),
            out,
            ckpt,
            network_def=stub,
            device=f"$torch.device('{device}')",
            gpu_pipeline=resident,
            tasks="liver,spleen",
            save_masks=True,
            save_probabilities=True,
        )
        assert summary["failed"] == [], summary
        outputs[run] = {p.name: np.asarray(nib.load(str(p)).dataobj) for p in out.glob("*.nii.gz")}
        pipelines[run] = json.loads((out / "ct_report.json").read_text())["pipeline"]
    assert pipelines["cuda"]["resident"] is True and pipelines["cuda"]["peak_gpu_memory_mb"] > 0
    assert pipelines["cuda_host"]["resident"] is False and pipelines["cpu"]["resident"] is False
    for name, cpu in outputs["cpu"].items():
        if not name.endswith("_prob.nii.gz"):
            np.testing.assert_array_equal(outputs["cuda_host"][name], cpu, err_msg=f"host pipeline: {name}")
    assert set(outputs["cuda"]) == set(outputs["cpu"]) and "ct_liver_tumor_prob.nii.gz" in outputs["cuda"]
    np.testing.assert_array_equal(outputs["cuda"]["ct_liver_mask.nii.gz"] > 0, expected_liver_labels(hu) > 0)
    for name, cpu in outputs["cpu"].items():
        if name.endswith("_prob.nii.gz"):
            np.testing.assert_allclose(outputs["cuda"][name], cpu, atol=2e-3)
        else:
            np.testing.assert_array_equal(outputs["cuda"][name], cpu, err_msg=name)


def test_connected_components_on_the_gpu_match_scikit_image():
    rng = np.random.default_rng(0)
    mask = torch.as_tensor(rng.random((40, 33, 21)) < 0.12)
    expected, count = label_components(mask)  # scikit-image on the CPU
    for labels, n in (label_components_torch(mask.cuda()), label_components(mask.cuda())):  # torch; cuCIM or torch
        assert labels.device.type == "cuda" and n == count
        np.testing.assert_array_equal(labels.cpu().numpy(), expected.numpy())


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_channels_last_stays_close_to_fp32(precision):
    net = tiny_dodnet().cuda()
    image = torch.rand(1, 1, 64, 64, 32) * 2 - 1
    common = {"roi_size": (64, 64, 32), "sw_device": "cuda", "stitch_dtype": "float32"}
    with torch.no_grad():
        reference = TaskSlidingWindowInferer(**common)(image, net)
        fast = TaskSlidingWindowInferer(**common, precision=precision, channels_last=True)(image, net)
    assert next(net.parameters()).is_contiguous(memory_format=torch.channels_last_3d)
    difference = (fast - reference).abs()
    assert difference.mean() < 2e-3 and difference.max() < 0.05, (difference.mean(), difference.max())


def test_compiled_head_on_gpu_matches_eager():
    net, x = tiny_dodnet().cuda(), torch.randn(1, 1, 32, 32, 16, device="cuda")
    tasks = torch.tensor([[5, 0, 3]], device="cuda")
    with torch.inference_mode():
        expected = net(x, tasks)
        compile_dynamic_heads(net)
        compiled = net(x, tasks)
        assert fused_head_status() == "compiled"  # the Triton kernel ran, not the fallback
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)


def test_compiled_network_on_gpu_matches_eager_bf16():
    net = tiny_dodnet().cuda()
    image = torch.rand(1, 1, 64, 64, 32) * 2 - 1
    common = {"roi_size": (32, 32, 16), "sw_device": "cuda", "stitch_dtype": "float32", "precision": "bf16"}
    with torch.no_grad():
        eager = TaskSlidingWindowInferer(**common)(image, net)
        compiled = TaskSlidingWindowInferer(**common, compile_network=True)(image, net)
    assert "_compiled_network" in net.__dict__
    assert (compiled - eager).abs().max() < 0.02


def test_training_augmentation_on_the_gpu_matches_the_cpu():
    """train.json's augment_on_device: the augmented batch stays on the GPU and equals the CPU path's for the
    same seed (GPU interpolation and convolution round differently, hence the tolerance)."""
    from monai.data import list_data_collate
    from monai.engines import PrepareBatchExtraInput
    from monai.utils import set_determinism
    from test_device_augmentation import _parser, _samples

    from scripts.training import AugmentOnDevice

    results = []
    for device in ("cpu", "cuda"):
        set_determinism(seed=3)
        parser = _parser(augment_on_device=True)
        augment = parser.get_parsed_content("train#augmentations") + [parser.get_parsed_content("map_task_labels")]
        prepare = PrepareBatchExtraInput(extra_keys={"task_id": "task_id"})
        image, label, _, _ = AugmentOnDevice(augment, prepare)(list_data_collate(_samples()), torch.device(device))
        assert image.device.type == device and label.device.type == device
        results.append((image.cpu(), label.cpu()))
    torch.testing.assert_close(results[1][0].as_tensor(), results[0][0].as_tensor(), atol=1e-3, rtol=0)
    assert (results[1][1].as_tensor() != results[0][1].as_tensor()).float().mean() < 0.01
