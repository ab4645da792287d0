"""Fast inference paths (channels-last, bf16 autocast) agree with the plain fp32 forward."""

from __future__ import annotations

import pytest
import torch

from scripts.acceleration import autocast, input_to_channels_last, to_channels_last
from scripts.inferer import TaskSlidingWindowInferer
from scripts.networks import DoDNet


def tiny_net() -> DoDNet:
    torch.manual_seed(0)
    return DoDNet(base_channels=4, blocks=(1, 1, 1, 1, 1)).eval()


def test_channels_last_forward_equals_contiguous():
    net, x = tiny_net(), torch.randn(2, 1, 32, 32, 16)
    with torch.inference_mode():
        expected = net(x)
        fast = to_channels_last(net)(input_to_channels_last(x))
    torch.testing.assert_close(fast, expected, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_is_close_to_fp32():
    net, x = tiny_net(), torch.randn(1, 1, 32, 32, 16)
    with torch.inference_mode():
        expected = torch.sigmoid(net(x))
        with autocast("cpu", "bf16"):
            logits = net(x)
        assert logits.dtype == torch.bfloat16  # the path really runs in bf16
    assert (torch.sigmoid(logits.float()) - expected).abs().max() < 0.05


def test_precision_names_are_checked():
    with pytest.raises(ValueError, match="precision must be one of"):
        autocast("cpu", "int8")
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        autocast("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be one of"):
        TaskSlidingWindowInferer(roi_size=(32, 32, 16), precision="half")


def test_inferer_fast_path_matches_fp32_eager():
    net, image = tiny_net(), torch.randn(1, 1, 40, 36, 20)
    plain = TaskSlidingWindowInferer(roi_size=(32, 32, 16), stitch_dtype="float32")
    fast = TaskSlidingWindowInferer(roi_size=(32, 32, 16), stitch_dtype="float32", precision="bf16", channels_last=True)
    with torch.inference_mode():
        expected = plain(image, net)
        probabilities = fast(image, net)
    assert probabilities.shape == expected.shape == (1, 14, 40, 36, 20)
    assert (probabilities - expected).abs().max() < 0.05
    assert ((probabilities > 0.5) == (expected > 0.5)).float().mean() > 0.99
