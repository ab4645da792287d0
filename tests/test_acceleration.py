"""Fast inference paths (channels-last, bf16 autocast, compiled head) agree with the plain fp32 forward."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from monai.bundle import ConfigParser

from scripts.inference.inferer import TaskSlidingWindowInferer
from scripts.networks import DoDNet, DynamicHead
from scripts.networks import fused_head as fused_head_module
from scripts.networks.acceleration import (
    autocast,
    compile_dynamic_heads,
    compile_network,
    input_to_channels_last,
    to_channels_last,
)
from scripts.networks.fused_head import fused_head_status, pointwise_head

needs_compiler = pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile of the dynamic head needs a C++ compiler on the CPU; none on PATH",
)


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
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        autocast("cpu", "int8")
    with pytest.raises(ValueError, match="fp16 autocast is for GPUs"):
        autocast("cpu", "fp16")
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
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


@pytest.mark.parametrize("depth, width", [(2, 4), (3, 8), (4, 16)])
def test_pointwise_head_equals_the_eager_head(depth, width):
    torch.manual_seed(depth)
    head = DynamicHead(in_channels=8, width=width, depth=depth)
    features, params = torch.randn(2, 8, 6, 5, 4), 0.5 * torch.randn(2, 3, head.num_params)
    weights, biases = head.split_params(params)
    expected = head(features, params)
    for k in range(3):  # the pointwise form computes one head: the k-th task's two channels
        out = pointwise_head(features.reshape(2, 8, -1), [w[:, k] for w in weights], [b[:, k] for b in biases])
        # same sums in another order (float32 rounding only)
        torch.testing.assert_close(out.reshape(2, 2, 6, 5, 4), expected[:, 2 * k : 2 * k + 2], atol=1e-4, rtol=1e-4)


@needs_compiler
def test_compiled_head_matches_eager_in_fp32_and_bf16():
    net, x = tiny_net(), torch.randn(1, 1, 32, 32, 16)
    tasks = torch.tensor([[5, 0, 3]])
    with torch.inference_mode():
        expected = net(x, tasks)
        with autocast("cpu", "bf16"):
            expected_bf16 = net(x, tasks)
        compile_dynamic_heads(net)
        compiled = net(x, tasks)
        assert fused_head_status() == "compiled"  # the fused kernel ran, not the fallback
        with autocast("cpu", "bf16"):
            compiled_bf16 = net(x, tasks)
    torch.testing.assert_close(compiled, expected, atol=1e-5, rtol=1e-5)
    assert compiled_bf16.dtype == torch.bfloat16
    # the fused kernel keeps hidden activations in float32: at least as close to fp32 as the eager bf16 head
    error_compiled = (compiled_bf16.float() - expected).abs().max()
    error_eager = (expected_bf16.float() - expected).abs().max()
    assert error_compiled <= error_eager + 0.02 * expected.abs().max()


def test_compiled_head_is_not_used_with_autograd(monkeypatch):
    calls = []
    monkeypatch.setattr(fused_head_module, "_compiled", lambda *args: calls.append(1) or None)
    net, x = tiny_net(), torch.randn(1, 1, 32, 32, 16)
    compile_dynamic_heads(net)
    out = net(x, torch.tensor([1]))
    assert out.requires_grad and calls == []  # training keeps the eager, differentiable head
    out.sum().backward()
    assert net.controller.fc.weight.grad is not None  # gradients reach the controller through the head


def test_compile_failure_warns_once_and_keeps_the_eager_head(monkeypatch):
    def broken(*args):
        raise RuntimeError("no working C++ compiler\ndetails")

    monkeypatch.setattr(fused_head_module, "_compiled", broken)
    monkeypatch.setattr(fused_head_module, "_failure", None)
    net, x = tiny_net(), torch.randn(1, 1, 32, 32, 16)
    with torch.inference_mode():
        expected = net(x)
        compile_dynamic_heads(net)
        with pytest.warns(UserWarning, match="compiling the dynamic head failed .*no working C\\+\\+ compiler"):
            out = net(x)
        torch.testing.assert_close(out, expected)
        assert fused_head_status() == "unavailable: RuntimeError: no working C++ compiler"
        torch.testing.assert_close(net(x), expected)  # later calls stay eager without compiling again


def test_compile_dynamic_heads_switches_every_head_and_rejects_other_networks():
    net = tiny_net()
    assert compile_dynamic_heads(net) is net and net.head.compiled
    compile_dynamic_heads(net, enabled=False)
    assert not net.head.compiled
    with pytest.raises(ValueError, match="Conv3d has no DoDNet dynamic head"):
        compile_dynamic_heads(torch.nn.Conv3d(1, 1, 1))


@needs_compiler
def test_inference_config_compile_head_runs_the_compiled_kernel(bundle_root):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    assert parser["compile_head"] is False  # opt-in: compiling costs seconds and needs a compiler
    # fp32: this compares the compiled with the eager head, not bf16 with fp32
    parser.update(
        {"compile_head": True, "precision": "fp32", "patch_size": [32, 32, 16], "bundle_root": str(bundle_root)}
    )
    inferer = parser.get_parsed_content("inferer")
    assert inferer.compile_head
    net, image = tiny_net(), torch.randn(1, 1, 40, 36, 20)
    plain = TaskSlidingWindowInferer(roi_size=(32, 32, 16), stitch_dtype="float16")
    with torch.inference_mode():
        expected = plain(image, net)
        assert not net.head.compiled
        probabilities = inferer(image, net)
    assert net.head.compiled and fused_head_status() == "compiled"
    torch.testing.assert_close(probabilities, expected, atol=2e-3, rtol=0)


def test_whole_network_traces_into_one_graph():
    """No graph break in the inference forward (the cached standardized kernels are traced, not looked up)."""
    net, x = tiny_net(), torch.randn(1, 1, 32, 32, 16)
    with torch.inference_mode():
        explained = torch._dynamo.explain(net)(x, torch.tensor([[2, 6]]))
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


@needs_compiler
def test_inference_config_compile_network_matches_eager(bundle_root):
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    assert parser["compile_network"] is False  # opt-in: compiling takes tens of seconds
    parser.update(
        {"compile_network": True, "precision": "fp32", "patch_size": [32, 32, 16], "bundle_root": str(bundle_root)}
    )
    inferer = parser.get_parsed_content("inferer")
    net, image = tiny_net(), torch.randn(1, 1, 40, 36, 20)
    keys = set(net.state_dict())
    plain = TaskSlidingWindowInferer(roi_size=(32, 32, 16), stitch_dtype="float16", channels_last=True)
    with torch.inference_mode():
        expected = plain(image, net)
        probabilities = inferer(image, net)
    torch.testing.assert_close(probabilities, expected, atol=2e-3, rtol=0)
    compiled = compile_network(net)
    assert compiled is compile_network(net)  # made once per network, reused by later cases
    assert set(net.state_dict()) == keys and compiled not in list(net.modules())


def test_compile_network_rejects_torchscript():
    scripted = torch.jit.script(torch.nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="cannot torch.compile a RecursiveScriptModule"):
        compile_network(scripted)


@pytest.mark.parametrize(
    "flags, onednn, expected",
    [
        ({"avx512f", "avx512_bf16"}, True, "bf16"),
        ({"amx_bf16", "amx_tile"}, True, "bf16"),
        ({"avx512f", "avx2"}, True, "fp32"),
        (set(), True, "fp32"),
        ({"avx512f", "avx512_bf16"}, False, "fp32"),
    ],
    ids=["avx512-bf16", "amx", "avx512-without-bf16", "unknown-cpu", "onednn-capped"],
)
def test_auto_precision_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, flags, onednn, expected):
    from scripts.networks import acceleration

    monkeypatch.setattr(acceleration, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(acceleration, "onednn_runs_bf16", lambda: onednn)
    assert acceleration.resolve_precision("auto", "cpu") == expected
    assert acceleration.resolve_precision("fp32", "cpu") == "fp32"
    with acceleration.autocast("cpu", "auto"):
        y = torch.nn.functional.linear(torch.ones(2, 4), torch.ones(3, 4))
    assert y.dtype == (torch.bfloat16 if expected == "bf16" else torch.float32)


def test_auto_precision_is_fp32_where_onednn_is_capped_below_avx512():
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN emulate bf16 (a 64 x 64 x 32 demo case took 12 s instead of 1)."""
    import subprocess
    import sys

    from helpers.paths import BUNDLE_ROOT

    code = "from scripts.networks.acceleration import resolve_precision; print(resolve_precision('auto', 'cpu'))"
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "fp32"


def test_cpu_flags_are_read_from_cpuinfo():
    from pathlib import Path

    from scripts.networks.acceleration import cpu_flags

    if not Path("/proc/cpuinfo").is_file():
        pytest.skip("no /proc/cpuinfo on this system (the detection then answers fp32)")
    assert "fpu" in cpu_flags() or "neon" in cpu_flags() or "asimd" in cpu_flags()


_COMPILE_PROBE = """
import json, sys, torch
from torch._dynamo.utils import counters
from scripts.networks.acceleration import compile_network
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.GroupNorm(2, 4), torch.nn.ReLU()).eval()
with torch.inference_mode():
    compile_network(net, sys.argv[1])(torch.zeros(1, 1, 8, 8, 8))
print(json.dumps(dict(counters["inductor"])))
"""


@needs_compiler
def test_compile_network_reuses_the_compiled_kernels_of_an_earlier_process(tmp_path, bundle_root):
    """The first process compiles and fills the cache folder; a second process on the machine loads the compiled
    graph from it (an FX-graph cache hit) instead of compiling again."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k}
    env["OMP_NUM_THREADS"] = "1"
    cache = tmp_path / "inductor"
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_PROBE, str(cache)],
            cwd=bundle_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    assert runs[0].get("fxgraph_cache_miss", 0) >= 1 and runs[0].get("fxgraph_cache_hit", 0) == 0
    assert runs[1].get("fxgraph_cache_hit", 0) >= 1 and runs[1].get("fxgraph_cache_miss", 0) == 0
    assert any(cache.iterdir())


def test_unwritable_compile_cache_warns_and_keeps_the_default(tmp_path, monkeypatch) -> None:
    import os

    from scripts.networks.acceleration import use_compile_cache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # restored (unset or as before) after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    with pytest.warns(UserWarning, match="compile_cache .*file.* cannot be used"):
        assert use_compile_cache(str(blocker / "inductor")) in (None, default_cache_dir())  # PyTorch's own
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir())
    assert use_compile_cache(str(tmp_path / "ok")) == str(tmp_path / "ok")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ok")
