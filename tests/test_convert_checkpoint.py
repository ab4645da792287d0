"""The authors' checkpoint converter, checked against a reference forward of the published layout.

``official_layout`` and ``reference_forward`` are written from the facts about the authors' code
(original-implementation-facts.md), independently of ``scripts.networks``: keys, shapes, the
(N, C, D, H, W) axis order, weight standardization, GroupNorm(16), pre-activation residual blocks,
trilinear upsampling, GAP, the controller as a 1x1x1 conv and the dynamic head as a grouped conv.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from scripts.networks.convert_official_checkpoint import (
    CheckpointMismatchError,
    build_network,
    convert,
    convert_state_dict,
    load_official_state_dict,
)

NUM_TASKS = 7
NUM_PARAMS = 162


def _block(prefix: str, c_in: int, c_out: int, shortcut: bool) -> List[Tuple[str, List[int]]]:
    shapes = [
        (f"{prefix}.gn1.weight", [c_in]),
        (f"{prefix}.gn1.bias", [c_in]),
        (f"{prefix}.conv1.weight", [c_out, c_in, 3, 3, 3]),
        (f"{prefix}.gn2.weight", [c_out]),
        (f"{prefix}.gn2.bias", [c_out]),
        (f"{prefix}.conv2.weight", [c_out, c_out, 3, 3, 3]),
    ]
    if shortcut:
        shapes += [
            (f"{prefix}.downsample.0.weight", [c_in]),
            (f"{prefix}.downsample.0.bias", [c_in]),
            (f"{prefix}.downsample.2.weight", [c_out, c_in, 1, 1, 1]),
        ]
    return shapes


def official_layout() -> List[Tuple[str, List[int]]]:
    """The published key layout (names and shapes) in checkpoint order."""
    shapes = [("conv1.weight", [32, 1, 3, 3, 3])]
    shapes += _block("layer0.0", 32, 32, False)
    for stage, (c_in, c_out) in enumerate([(32, 64), (64, 128), (128, 256), (256, 256)], start=1):
        shapes += _block(f"layer{stage}.0", c_in, c_out, True) + _block(f"layer{stage}.1", c_out, c_out, False)
    shapes += [
        ("fusionConv.0.weight", [256]),
        ("fusionConv.0.bias", [256]),
        ("fusionConv.2.weight", [256, 256, 1, 1, 1]),
    ]
    shapes += _block("x8_resb.0", 256, 128, True) + _block("x4_resb.0", 128, 64, True)
    shapes += _block("x2_resb.0", 64, 32, True) + _block("x1_resb.0", 32, 32, False)
    shapes += [
        ("precls_conv.0.weight", [32]),
        ("precls_conv.0.bias", [32]),
        ("precls_conv.2.weight", [8, 32, 1, 1, 1]),
        ("precls_conv.2.bias", [8]),
        ("GAP.0.weight", [256]),
        ("GAP.0.bias", [256]),
        ("controller.weight", [NUM_PARAMS, 256 + NUM_TASKS, 1, 1, 1]),
        ("controller.bias", [NUM_PARAMS]),
    ]
    return shapes


def random_official_state(seed: int = 0, prefix: str = "module.") -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state: Dict[str, torch.Tensor] = OrderedDict()
    for name, shape in official_layout():
        if len(shape) == 1 and name.endswith("weight"):  # GroupNorm scale
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif len(shape) == 1:  # biases
            value = 0.1 * torch.randn(shape, generator=gen)
        elif name.startswith("controller"):
            value = 0.05 * torch.randn(shape, generator=gen)
        else:
            value = torch.randn(shape, generator=gen) / (shape[1] * shape[2] * shape[3] * shape[4]) ** 0.5
        state[prefix + name] = value
    return state


# ---- reference forward of the published network, (N, C, D, H, W) order ------------------------------


def _ws(w: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1).reshape(-1, 1, 1, 1, 1)
    var = flat.var(1, unbiased=True).reshape(-1, 1, 1, 1, 1)
    return (w - mean) / torch.sqrt(var + 1e-12)


def _conv(x, sd, name, stride=1, ws=True):
    w = sd[f"{name}.weight"]
    return F.conv3d(x, _ws(w) if ws else w, sd.get(f"{name}.bias"), stride=stride, padding=w.shape[-1] // 2)


def _gn_relu(x, sd, name):
    return F.relu(F.group_norm(x, 16, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5))


def _res(x, sd, p, stride=1):
    out = _conv(_gn_relu(x, sd, f"{p}.gn1"), sd, f"{p}.conv1", stride)
    out = _conv(_gn_relu(out, sd, f"{p}.gn2"), sd, f"{p}.conv2")
    if f"{p}.downsample.2.weight" in sd:
        return out + _conv(_gn_relu(x, sd, f"{p}.downsample.0"), sd, f"{p}.downsample.2", stride)
    return out + x


def _up(x):
    return F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)


def reference_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, tasks: List[int]) -> torch.Tensor:
    """The published DoDNet: x (N, 1, D, H, W), one task per sample -> logits (N, 2, D, H, W)."""
    x = _conv(x, sd, "conv1")
    skip0 = _res(x, sd, "layer0.0")
    skip1 = _res(_res(skip0, sd, "layer1.0", 2), sd, "layer1.1")
    skip2 = _res(_res(skip1, sd, "layer2.0", 2), sd, "layer2.1")
    skip3 = _res(_res(skip2, sd, "layer3.0", 2), sd, "layer3.1")
    x = _res(_res(skip3, sd, "layer4.0", 2), sd, "layer4.1")
    x = _conv(_gn_relu(x, sd, "fusionConv.0"), sd, "fusionConv.2")
    gap = F.adaptive_avg_pool3d(_gn_relu(x, sd, "GAP.0"), 1)  # (N, 256, 1, 1, 1)
    x = _res(_up(x) + skip3, sd, "x8_resb.0")
    x = _res(_up(x) + skip2, sd, "x4_resb.0")
    x = _res(_up(x) + skip1, sd, "x2_resb.0")
    x = _res(_up(x) + skip0, sd, "x1_resb.0")
    preseg = _conv(_gn_relu(x, sd, "precls_conv.0"), sd, "precls_conv.2", ws=False)  # (N, 8, D, H, W)
    n = x.shape[0]
    onehot = F.one_hot(torch.tensor(tasks), NUM_TASKS).float().reshape(n, NUM_TASKS, 1, 1, 1)
    params = F.conv3d(torch.cat([gap, onehot], 1), sd["controller.weight"], sd["controller.bias"]).reshape(n, -1)
    w1, w2, w3 = params[:, 0:64], params[:, 64:128], params[:, 128:144]
    b1, b2, b3 = params[:, 144:152], params[:, 152:160], params[:, 160:162]
    # the dynamic head of every sample as one grouped conv (groups = batch size), as the authors run it
    y = preseg.reshape(1, n * 8, *preseg.shape[2:])
    y = F.relu(F.conv3d(y, w1.reshape(n * 8, 8, 1, 1, 1), b1.reshape(-1), groups=n))
    y = F.relu(F.conv3d(y, w2.reshape(n * 8, 8, 1, 1, 1), b2.reshape(-1), groups=n))
    y = F.conv3d(y, w3.reshape(n * 2, 8, 1, 1, 1), b3.reshape(-1), groups=n)
    return y.reshape(n, 2, *preseg.shape[2:])


# ---- tests ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def official_state() -> Dict[str, torch.Tensor]:
    return random_official_state()


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, official_state) -> Path:
    path = tmp_path_factory.mktemp("official") / "MOTS_DynConv_checkpoint.pth"
    torch.save(official_state, path)
    return path


@pytest.fixture(scope="module")
def converted_net(tmp_path_factory, official_file):
    dst = tmp_path_factory.mktemp("converted") / "model.pt"
    convert(str(official_file), str(dst))
    net = build_network()
    state = torch.load(dst, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def test_layout_matches_published_parameter_count():
    shapes = official_layout()
    assert len(shapes) == 111
    assert sum(torch.Size(s).numel() for _, s in shapes) == 17_329_528


def test_converted_output_equals_reference_for_every_task(converted_net, official_state):
    sd = {k[len("module.") :]: v for k, v in official_state.items()}
    x_dhw = torch.randn(2, 1, 16, 32, 48, generator=torch.Generator().manual_seed(1))  # (N, C, D, H, W)
    x_hwd = x_dhw.permute(0, 1, 3, 4, 2)  # MONAI's (B, C, H, W, D)
    with torch.no_grad():
        ours_all = converted_net(x_hwd).permute(0, 1, 4, 2, 3)  # all tasks, back to (N, 14, D, H, W)
        ours_mixed = converted_net(x_hwd, torch.tensor([3, 5])).permute(0, 1, 4, 2, 3)  # one task per sample
        for task in range(NUM_TASKS):
            ref = reference_forward(sd, x_dhw, [task, task])
            assert ref.abs().max() > 0.1  # a non-trivial output
            err = (ours_all[:, 2 * task : 2 * task + 2] - ref).abs().max()
            assert err < 1e-4, (task, err)
        ref_mixed = reference_forward(sd, x_dhw, [3, 5])
    assert (ours_mixed - ref_mixed).abs().max() < 1e-4


def test_without_kernel_permutation_the_outputs_differ(official_state):
    """Negative control: loading the kernels in the authors' axis order would be wrong."""
    sd = {k[len("module.") :]: v for k, v in official_state.items()}
    net = build_network().eval()
    state = convert_state_dict(sd, net.state_dict())
    for key, value in state.items():
        if value.dim() == 5 and value.shape[-1] == 3:
            state[key] = value.permute(0, 1, 4, 2, 3).contiguous()  # undo the permutation
    net.load_state_dict(state)
    x_dhw = torch.randn(1, 1, 16, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        wrong = net(x_dhw.permute(0, 1, 3, 4, 2), torch.tensor([0])).permute(0, 1, 4, 2, 3)
    assert (wrong - reference_forward(sd, x_dhw, [0])).abs().max() > 1e-2


def test_weight_standardization_carries_raw_weights(official_state):
    """The converted kernels are the authors' raw (unstandardized) kernels, permuted."""
    sd = {k[len("module.") :]: v for k, v in official_state.items()}
    state = convert_state_dict(sd, build_network().state_dict())
    raw = sd["layer2.0.conv1.weight"]
    assert torch.equal(state["backbone.layer2.0.conv1.weight"], raw.permute(0, 1, 3, 4, 2))
    assert torch.equal(state["controller.fc.weight"], sd["controller.weight"].reshape(162, 263))


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}, "amp": {"scale": 1.0}},
        lambda sd: {"model": {k: v.half() for k, v in sd.items()}},
        lambda sd: {"state_dict": {"module." + k: v for k, v in sd.items()}},
    ],
    ids=["plain", "apex-dict", "fp16", "nested-module"],
)
def test_loader_accepts_published_wrappings(tmp_path, official_state, wrap):
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(official_state), path)
    loaded = load_official_state_dict(path)
    assert list(loaded) == [k[len("module.") :] for k in official_state]
    assert all(v.dtype == torch.float32 for v in loaded.values())


def test_mismatch_lists_missing_unexpected_and_misshaped(official_state):
    sd = {k[len("module.") :]: v for k, v in official_state.items()}
    del sd["layer3.1.conv2.weight"]
    sd["extra_head.weight"] = torch.zeros(3)
    sd["GAP.0.bias"] = torch.zeros(128)
    with pytest.raises(CheckpointMismatchError) as err:
        convert_state_dict(sd, build_network().state_dict(), source="ckpt.pth")
    msg = str(err.value)
    assert "ckpt.pth" in msg
    assert "missing (1): layer3.1.conv2.weight" in msg
    assert "unexpected (1): extra_head.weight" in msg
    assert "GAP.0.bias [128]" in msg and "expected [256]" in msg


def test_tiny_network_mismatch_is_reported(official_file, tmp_path):
    with pytest.raises(CheckpointMismatchError, match="wrong shape"):
        convert(str(official_file), str(tmp_path / "model.pt"), network_args={"base_channels": 8})
    assert not (tmp_path / "model.pt").exists()


class _NotWeights:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_refuses_pickle_that_is_not_weights(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _NotWeights()}, f)
    with pytest.raises(ValueError, match=r"evil\.pth: refused to load: not a weights-only"):
        load_official_state_dict(path)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="garbage.pth: refused"):
        load_official_state_dict(garbage)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_official_state_dict(tmp_path / "missing.pth")


def test_rejects_non_state_dict(tmp_path):
    path = tmp_path / "opt.pth"
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="opt.pth: not a state dict of tensors"):
        load_official_state_dict(path)


def test_refuses_to_overwrite(official_file, tmp_path):
    dst = tmp_path / "model.pt"
    dst.write_bytes(b"existing")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(str(official_file), str(dst))
    assert dst.read_bytes() == b"existing"


def test_cli_from_bundle_root(official_file, tmp_path, bundle_root):
    dst = tmp_path / "cli" / "model.pt"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.networks.convert_official_checkpoint",
            "--src",
            str(official_file),
            "--dst",
            str(dst),
        ],
        cwd=bundle_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "converted 111 tensors (17,329,528 parameters)" in proc.stdout
    assert dst.stat().st_mode & 0o777 == 0o644  # shareable, not the 0600 of a temp file
    state = torch.load(dst, map_location="cpu", weights_only=True)
    assert state["controller.fc.weight"].shape == (162, 263)


def test_official_weights_override_sets_the_authors_spacing(bundle_root):
    from monai.bundle import ConfigParser
    from monai.transforms import Spacingd

    configs = bundle_root / "configs"

    def pixdim(files):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in files])
        parser["bundle_root"] = str(bundle_root)
        (spacing,) = [t for t in parser.get_parsed_content("preprocessing_steps") if isinstance(t, Spacingd)]
        return tuple(float(v) for v in spacing.spacing_transform.pixdim)

    assert pixdim(["inference.json"]) == pytest.approx((0.8, 0.8, 1.5))
    # authors: 3 x 0.76 x 0.76 mm (slice, row, col) -> MONAI (H, W, D) after RAS reorientation
    assert pixdim(["inference.json", "official_weights.json"]) == pytest.approx((0.76, 0.76, 3.0))
