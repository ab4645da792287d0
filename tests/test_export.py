"""ONNX export of the all-task network, run in onnxruntime and compared with PyTorch (tiny width)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from scripts.inference.export import export_onnx
from scripts.networks import DoDNet, WSConv3d
from scripts.networks.export_variants import AllTasksNetwork, fold_weight_standardization, prepare_for_export

TINY = {"base_channels": 8}
ROI = (32, 32, 16)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    torch.save({"model": DoDNet(**TINY).state_dict()}, path)  # the wrapped form is accepted too
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, tiny_ckpt) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export_onnx(str(path), str(tiny_ckpt), roi_size=ROI, batch_size=2, network_args=TINY)
    return path


@pytest.fixture(scope="module")
def eager(tiny_ckpt) -> DoDNet:
    net = DoDNet(**TINY).eval()
    net.load_state_dict(torch.load(tiny_ckpt, weights_only=True)["model"])
    return net


def test_onnx_matches_pytorch_for_all_tasks(onnx_file, eager):
    model = onnx.load(str(onnx_file))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image"] and [o.name for o in model.graph.output] == ["pred"]
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 1, *ROI, generator=torch.Generator().manual_seed(5))
    (pred,) = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        expected = eager(x)
        wrapped = AllTasksNetwork(eager)(x)
    assert pred.shape == (2, 14, *ROI)
    assert torch.equal(wrapped, expected)
    assert np.abs(pred - expected.numpy()).max() < 1e-4
    with torch.no_grad():
        for task in range(7):  # channels 2k, 2k+1 are task k's organ and tumor logits
            single = eager(x, torch.tensor([task])).numpy()
            assert np.abs(pred[:, 2 * task : 2 * task + 2] - single).max() < 1e-4, task


def test_folded_weight_standardization_is_exact_and_keeps_the_graph_small(onnx_file, eager):
    folded = fold_weight_standardization(eager).eval()
    assert not any(isinstance(m, WSConv3d) for m in folded.modules())
    assert any(isinstance(m, WSConv3d) for m in eager.modules())  # the original is untouched
    x = torch.randn(1, 1, *ROI, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (folded(x) - eager(x)).abs().max() < 1e-5
        assert (folded(x, torch.tensor([2])) - eager(x, torch.tensor([2]))).abs().max() < 1e-5
        exported = prepare_for_export(eager).eval()  # folded + the batched dynamic head
        assert (exported(x) - eager(x)).abs().max() < 1e-5
        assert (exported(x, torch.tensor([[6, 1]])) - eager(x, torch.tensor([[6, 1]]))).abs().max() < 1e-5
    # one float32 copy of the weights plus a small graph (no copies of kernels, no output-sized constants)
    param_bytes = 4 * sum(p.numel() for p in eager.parameters())
    assert onnx_file.stat().st_size < 1.3 * param_bytes
    assert oct(onnx_file.stat().st_mode & 0o777) == oct(0o644)


def test_onnx_rejects_other_shapes_instead_of_wrong_answers(onnx_file):
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)invalid dimensions|dimension"):
        session.run(None, {"image": np.zeros((1, 1, 48, 32, 16), dtype=np.float32)})


def test_export_errors_name_the_problem(tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match="not divisible by 16"):
        export_onnx(str(tmp_path / "a.onnx"), str(tiny_ckpt), roi_size=(30, 32, 16), network_args=TINY)
    with pytest.raises(ValueError, match=r"model\.pt: the weights do not fit the network defined by network_def"):
        export_onnx(str(tmp_path / "b.onnx"), str(tiny_ckpt), roi_size=ROI)  # full-width config, tiny weights
    with pytest.raises(FileNotFoundError, match="nothing.pt"):
        export_onnx(str(tmp_path / "c.onnx"), str(tmp_path / "nothing.pt"), roi_size=ROI)
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*.tmp"))


def test_export_cli(tmp_path, tiny_ckpt, bundle_root):
    out = tmp_path / "cli.onnx"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.inference.export",
            "--filepath",
            str(out),
            "--ckpt_file",
            str(tiny_ckpt),
            "--roi_size",
            "[32,32,16]",
            "--network_args",
            "{'base_channels': 8}",
        ],
        cwd=bundle_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (pred,) = session.run(None, {"image": np.zeros((1, 1, *ROI), dtype=np.float32)})
    assert pred.shape == (1, 14, *ROI)


def test_inference_trt_config_parses_and_merges_on_inference(bundle_root):
    """TensorRT needs torch_tensorrt and a GPU (absent here): check only that the override merges as intended."""
    import json

    from monai.bundle import ConfigParser

    configs = bundle_root / "configs"
    base = json.loads((configs / "inference.json").read_text())
    override = json.loads((configs / "inference_trt.json").read_text())
    parser = ConfigParser()
    parser.read_config([str(configs / "inference.json"), str(configs / "inference_trt.json")])
    for key in base:  # everything else comes unchanged from inference.json
        if key not in override:
            assert parser[key] == base[key], key
    parser["bundle_root"] = str(bundle_root)
    assert set(base["imports"]) <= set(parser["imports"]) and "$import torch_tensorrt" in parser["imports"]
    assert parser["network_def"] == "$torch.jit.load(@trt_model_path)"
    assert parser.get_parsed_content("trt_model_path") == f"{bundle_root}/models/model_trt.ts"
    assert parser["ckpt_path"] is None  # the TensorRT module carries its weights
