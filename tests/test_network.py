"""DoDNet network components: published size, task handling, one backbone pass, scripting, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from scripts.cli_errors import UsageError
from scripts.networks import (
    DoDNet,
    DynamicHead,
    TaskController,
    WSConv3d,
    contrast_kernels,
    local_contrast,
    standardize_weight,
)

TINY = dict(base_channels=4, blocks=(1, 1, 1, 1, 1))
SHAPE = (32, 32, 16)


def tiny_net(**kwargs) -> DoDNet:
    torch.manual_seed(0)
    return DoDNet(**{**TINY, **kwargs}).eval()


def count_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_published_parameter_count():
    net = DoDNet()
    assert count_params(net) == 17_329_528
    assert len(list(net.parameters())) == 111
    assert count_params(net.controller) == 42_768


@pytest.mark.parametrize("batch", [1, 3])
def test_output_shapes(batch):
    net = tiny_net()
    x = torch.randn(batch, 1, *SHAPE)
    with torch.no_grad():
        assert net(x).shape == (batch, 14, *SHAPE)
        assert net(x, torch.arange(batch) % 7).shape == (batch, 2, *SHAPE)
        assert net(x, torch.tensor([[0, 4, 6]] * batch)).shape == (batch, 6, *SHAPE)
        assert net(x, torch.tensor([5])).shape == (batch, 2, *SHAPE)
        assert net(x, torch.tensor([[1, 2]])).shape == (batch, 4, *SHAPE)
        assert net(x, torch.tensor(3)).shape == (batch, 2, *SHAPE)


def test_multi_task_output_equals_single_task_calls():
    net = tiny_net()
    x = torch.randn(3, 1, *SHAPE)
    with torch.no_grad():
        all_tasks = net(x)
        subset = net(x, torch.tensor([[6, 2, 0]]))
        for k in range(7):
            single = net(x, torch.tensor([k]))
            torch.testing.assert_close(all_tasks[:, 2 * k : 2 * k + 2], single, atol=1e-5, rtol=0)
        for j, k in enumerate([6, 2, 0]):
            torch.testing.assert_close(subset[:, 2 * j : 2 * j + 2], all_tasks[:, 2 * k : 2 * k + 2], atol=1e-5, rtol=0)
        # mixed tasks within a batch: each sample gets its own task
        mixed = net(x, torch.tensor([4, 0, 6]))
        for b, k in enumerate([4, 0, 6]):
            torch.testing.assert_close(mixed[b], all_tasks[b, 2 * k : 2 * k + 2], atol=1e-5, rtol=0)


def test_backbone_runs_once_per_call():
    net = tiny_net()
    calls = []
    net.backbone.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        net(x)
        assert len(calls) == 1
        net(x, torch.tensor([[0, 1, 2, 3, 4, 5, 6]]))
        assert len(calls) == 2


def test_weight_standardization_matches_direct_formula():
    torch.manual_seed(1)
    conv = WSConv3d(3, 5, 3, padding=1, bias=False)
    w = conv.weight.detach().double()
    expected = torch.empty_like(w)
    for o in range(w.shape[0]):
        values = w[o].flatten().tolist()
        n = len(values)
        mean = sum(values) / n
        var = sum((v - mean) ** 2 for v in values) / (n - 1)
        expected[o] = (w[o] - mean) / (var + 1e-12) ** 0.5
    torch.testing.assert_close(standardize_weight(w), expected)
    x = torch.randn(1, 3, 8, 8, 8)
    torch.testing.assert_close(conv(x), F.conv3d(x, expected.float(), padding=1), atol=1e-5, rtol=1e-5)
    # standardized kernels have zero mean and unit (unbiased) variance per output channel
    flat = standardize_weight(conv.weight).flatten(1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(flat.var(1), torch.ones(5), atol=1e-5, rtol=0)


def test_dynamic_head_matches_grouped_convolution_layout():
    """The authors apply the generated kernels as 1x1x1 grouped convs with params[o * c_in + i]."""
    torch.manual_seed(2)
    head = DynamicHead(8, 8, 3, 2)
    assert head.num_params == 162
    feats = torch.randn(2, 8, 4, 4, 4)
    params = torch.randn(2, 1, 162)
    out = head(feats, params)
    for b in range(2):
        p = params[b, 0]
        w1, w2, w3 = p[0:64].reshape(8, 8), p[64:128].reshape(8, 8), p[128:144].reshape(2, 8)
        b1, b2, b3 = p[144:152], p[152:160], p[160:162]
        x = F.relu(F.conv3d(feats[b : b + 1], w1[..., None, None, None], b1))
        x = F.relu(F.conv3d(x, w2[..., None, None, None], b2))
        x = F.conv3d(x, w3[..., None, None, None], b3)
        torch.testing.assert_close(out[b : b + 1], x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "depth,width,expected", [(2, 8, 8 * 8 + 2 * 8 + 8 + 2), (3, 4, 32 + 16 + 8 + 4 + 4 + 2), (4, 16, 0)]
)
def test_head_depth_and_width_are_configurable(depth, width, expected):
    net = tiny_net(head_depth=depth, head_width=width)
    if expected:
        assert net.head.num_params == expected
    assert net.controller.fc.out_features == net.head.num_params
    with torch.no_grad():
        assert net(torch.randn(1, 1, *SHAPE), torch.tensor([[1, 5]])).shape == (1, 4, *SHAPE)


def test_conditioning_modes():
    x = torch.randn(2, 1, *SHAPE)
    cond_no = tiny_net(conditioning="image")
    with torch.no_grad():
        out = cond_no(x)
    for k in range(1, 7):  # Cond-NO: no task prior, every task gets the same head
        torch.testing.assert_close(out[:, 2 * k : 2 * k + 2], out[:, 0:2])
    task_only = tiny_net(conditioning="task")
    feats = torch.randn(2, task_only.backbone.feature_channels)
    params = task_only.controller(feats, torch.tensor([[3], [3]]))
    torch.testing.assert_close(params[0], params[1])  # independent of the image
    assert task_only.controller.fc.in_features == 7
    assert tiny_net().controller.fc.in_features == 4 * 8 + 7
    with pytest.raises(ValueError, match="conditioning mode"):
        TaskController(7, 16, 162, mode="both")


def test_task_heads_initialization():
    net = tiny_net(controller_init="task_heads", head_width=16, preseg_channels=16)
    head, fc = net.head, net.controller.fc
    fan_in = head.param_fan_in()
    assert fan_in.shape == (head.num_params,)
    assert int((fan_in == 0).sum()) == sum(c_out for c_out, _ in head.layer_shapes)  # one entry per bias
    feats = torch.randn(3, net.backbone.feature_channels)
    params = net.controller(feats, torch.arange(7).expand(3, 7))  # (3 images, 7 tasks, num_params)
    torch.testing.assert_close(params[0], params[2])  # at the start the head depends on the task alone
    assert not torch.allclose(params[0, 0], params[0, 1])  # and every task has its own
    assert params[..., fan_in == 0].abs().max() == 0  # biases start at zero
    kernels = params[0][:, fan_in == 16]  # the second layer's kernels: He scale times the gain of 2
    assert 0.8 * 2 * (2 / 16) ** 0.5 < float(kernels.std()) < 1.2 * 2 * (2 / 16) ** 0.5
    net.train()
    net(torch.randn(2, 1, *SHAPE), torch.tensor([1, 4])).square().mean().backward()
    assert fc.weight.grad[:, : net.backbone.feature_channels].abs().sum() > 0  # image conditioning is learned
    with pytest.raises(ValueError, match="task encoding"):
        tiny_net(controller_init="task_heads", conditioning="image")
    with pytest.raises(ValueError, match="controller_init"):
        tiny_net(controller_init="xavier")


def test_weight_standardization_can_be_switched_off():
    assert any(isinstance(m, WSConv3d) for m in tiny_net().modules())
    plain = tiny_net(weight_std=False)
    assert not any(isinstance(m, WSConv3d) for m in plain.modules())
    assert count_params(plain) == count_params(tiny_net())


def test_scripted_model_equals_eager_for_every_task():
    net = tiny_net()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x))
        for k in range(7):
            task = torch.tensor([k, (k + 3) % 7])
            torch.testing.assert_close(scripted(x, task), net(x, task))


@pytest.mark.parametrize(
    "image_shape,task_id,message",
    [
        ((1, 1, 32, 32, 16), torch.tensor([7]), "task id 7 is out of range"),
        ((1, 1, 32, 32, 16), torch.tensor([-1]), "task id -1 is out of range"),
        ((1, 1, 32, 32, 16), torch.tensor([1.0]), "must be an integer tensor"),
        ((1, 1, 32, 32, 16), torch.tensor([True]), "must be an integer tensor"),
        ((1, 32, 32, 16), None, "image must be 5-D"),
        ((1, 2, 32, 32, 16), None, "1 channel"),
        ((1, 1, 30, 32, 16), None, "along axis H .*nearest valid size is 32"),
        ((1, 1, 32, 32, 20), None, "along axis D .*nearest valid size is 16"),
        ((1, 1, 32, 44, 16), None, "along axis W .*nearest valid size is 48 .pad or crop to 32 or 48"),
        ((2, 1, 32, 32, 16), torch.tensor([1, 2, 3]), "task_id has 3 rows but the image batch has 2"),
        ((2, 1, 32, 32, 16), torch.zeros(2, 1, 1, dtype=torch.long), r"shape \(B,\) or \(B, K\)"),
    ],
)
def test_bad_input_raises_clear_value_error(image_shape, task_id, message):
    net = tiny_net()
    with pytest.raises(ValueError, match=message):
        net(torch.randn(*image_shape), task_id)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="depth"):
        DoDNet(head_depth=5)
    with pytest.raises(ValueError, match="width"):
        DoDNet(head_width=3)
    with pytest.raises(ValueError, match="blocks"):
        DoDNet(blocks=(1, 2, 2))
    with pytest.raises(UsageError, match="blocks"):
        DoDNet(blocks=(1, 0, 1, 1, 1))


def test_first_stage_without_blocks():
    """blocks[0] = 0: the full-resolution stage is the stem alone (no layer0 weights), same outputs' shapes."""
    net = tiny_net(blocks=(0, 1, 1, 1, 1))
    full = tiny_net()
    assert not any(name.startswith("backbone.layer0.") for name in net.state_dict())
    layer0 = sum(p.numel() for n, p in full.named_parameters() if n.startswith("backbone.layer0."))
    assert layer0 > 0 and count_params(net) == count_params(full) - layer0
    x = torch.randn(2, 1, *SHAPE)
    with torch.no_grad():
        assert net(x, torch.tensor([0, 3])).shape == (2, 2, *SHAPE)
    stem = net.backbone.conv1(x)
    assert torch.equal(net.backbone.layer0(stem), stem)


def test_verify_net_in_out_passes(bundle_root):
    env = {**os.environ, "PYTHONPATH": str(bundle_root)}
    cmd = [
        sys.executable, "-m", "monai.bundle", "verify_net_in_out", "network_def",
        "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json",
        "--network_def#base_channels", "8",
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=bundle_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "verified with no error" in result.stdout + result.stderr


def test_gradients_reach_backbone_and_controller():
    net = tiny_net().train()
    net(torch.randn(2, 1, *SHAPE), torch.tensor([1, 4])).square().mean().backward()
    assert net.controller.fc.weight.grad.abs().sum() > 0
    assert net.backbone.conv1.weight.grad.abs().sum() > 0
    assert net.backbone.GAP[0].weight.grad.abs().sum() > 0  # the GAP branch conditions the head


def test_head_chunking_does_not_change_results():
    torch.manual_seed(3)
    feats, params = torch.randn(2, 8, 8, 8, 6), torch.randn(2, 3, 162)
    whole = DynamicHead(chunk_voxels=1 << 20)(feats, params)
    torch.testing.assert_close(DynamicHead(chunk_voxels=50)(feats, params), whole)


def test_training_path_of_the_head_equals_the_inference_path_and_its_gradients_the_chunked_ones():
    """With autograd on, the head runs whole-map batched products; same logits as the chunked inference path,
    and the same gradients as the chunked loop had."""
    torch.manual_seed(4)
    feats, params = torch.randn(2, 8, 8, 8, 6), torch.randn(2, 3, 162)
    head = DynamicHead(chunk_voxels=50)
    with torch.no_grad():
        chunked = head(feats, params)
    f, p = feats.clone().requires_grad_(), params.clone().requires_grad_()
    out = head(f, p)
    torch.testing.assert_close(out, chunked)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    f_ref, p_ref = feats.clone().requires_grad_(), params.clone().requires_grad_()
    weights, biases = head.split_params(p_ref)
    ref = []
    for b in range(2):
        y = torch.einsum("koc,cn->kon", weights[0][b], f_ref[b].reshape(8, -1)) + biases[0][b][..., None]
        for i in (1, 2):
            y = torch.einsum("koc,kcn->kon", weights[i][b], y.relu()) + biases[i][b][..., None]
        ref.append(y.reshape(6, 8, 8, 6))
    ref = torch.stack(ref)
    torch.testing.assert_close(ref, out.detach(), atol=1e-5, rtol=1e-5)
    (ref * torch.linspace(-1, 1, ref.numel()).reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(f.grad, f_ref.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(p.grad, p_ref.grad, atol=1e-5, rtol=1e-5)


def test_meta_tensor_input_is_computed_as_a_plain_tensor():
    """MONAI's loaders deliver MetaTensors; the network drops the metadata at the door (it would be carried
    through every layer at ~25% of a CPU training step) and returns the same values as a plain tensor."""
    from monai.data import MetaTensor

    net = tiny_net().train()
    x = torch.randn(2, 1, *SHAPE)
    plain = net(x, torch.tensor([1, 4]))
    meta = net(MetaTensor(x.clone(), affine=torch.diag(torch.tensor([0.8, 0.8, 1.5, 1.0]))), torch.tensor([1, 4]))
    assert type(meta) is torch.Tensor
    torch.testing.assert_close(meta, plain)
    meta.square().mean().backward()
    assert net.backbone.conv1.weight.grad.abs().sum() > 0


def test_in_place_sums_give_the_same_values_and_gradients(monkeypatch):
    """Residual and skip sums are written into the fresh convolution/upsampling output (saves memory
    traffic); values and gradients equal the out-of-place sum's."""
    from scripts.networks import backbone, blocks

    def outputs_and_grads():
        net = tiny_net().train()
        x = torch.randn(2, 1, *SHAPE, generator=torch.Generator().manual_seed(1))
        out = net(x, torch.tensor([2, 5]))
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in net.named_parameters()}

    out, grads = outputs_and_grads()
    for module in (blocks, backbone):
        monkeypatch.setattr(module, "add_into", lambda a, b: a + b)
    ref_out, ref_grads = outputs_and_grads()
    torch.testing.assert_close(out, ref_out)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_inference_reuses_the_standardized_kernel_until_the_weights_change():
    """Without autograd the standardized kernel is computed once; an optimizer step, load_state_dict or a
    device/format move must invalidate it."""
    net = tiny_net()
    x = torch.randn(1, 1, *SHAPE)
    conv = net.backbone.conv1

    def fresh():  # the definition, recomputed from the raw kernel
        return F.conv3d(x, standardize_weight(conv.weight), None, conv.stride, conv.padding)

    with torch.no_grad():
        first = conv(x)
        cached = conv.__dict__["_standardized"][1]
        torch.testing.assert_close(first, fresh())
        assert conv(x) is not first and conv.__dict__["_standardized"][1] is cached  # reused
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    net.train()
    net(x, torch.tensor([0])).square().mean().backward()
    opt.step()
    with torch.no_grad():
        torch.testing.assert_close(conv(x), fresh())  # in-place update seen
        other = tiny_net()
        other.backbone.conv1.weight.mul_(-1.0)
        net.load_state_dict(other.state_dict())
        torch.testing.assert_close(conv(x), fresh())
        net.to(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(conv(x), fresh())
    with torch.inference_mode():
        made_inside = DoDNet(**TINY).eval()  # inference-tensor parameters have no version counter
        assert made_inside(x).shape == (1, 14, *SHAPE)


def test_deep_supervision_outputs_lower_levels_in_training_only():
    """Training mode: logits at full, 1/2 and 1/4 resolution through the same generated heads; eval mode and
    TorchScript: the plain network's output, equal to that of a network without the extra modules."""
    net = tiny_net(deep_supervision=2).train()
    x, task = torch.randn(2, 1, *SHAPE), torch.tensor([1, 4])
    outputs = net(x, task)
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 32, 32, 16), (2, 2, 16, 16, 8), (2, 2, 8, 8, 4)]
    sum(o.square().mean() for o in outputs[1:]).backward()  # only the lower levels' loss
    for level in net.backbone.ds_precls:
        assert level[2].weight.grad.abs().sum() > 0
    assert net.controller.fc.weight.grad.abs().sum() > 0  # the same generated heads
    assert net.backbone.precls_conv[2].weight.grad is None  # the full-resolution map is not on their path
    plain = tiny_net()
    plain.load_state_dict(net.state_dict())  # strict: the deep-supervision modules are dropped
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, task), plain(x, task))
        torch.testing.assert_close(torch.jit.script(net)(x, task), plain(x, task))


def test_deep_supervision_checkpoints_load_either_way(tmp_path):
    from scripts.networks.weights import CheckpointError, load_network_weights

    with_ds, without = tiny_net(deep_supervision=3), tiny_net(base_channels=4)
    torch.save(with_ds.state_dict(), tmp_path / "ds.pt")
    torch.save(without.state_dict(), tmp_path / "plain.pt")
    load_network_weights(tiny_net(), tmp_path / "ds.pt")
    own = {k: v.clone() for k, v in with_ds.backbone.ds_precls.state_dict().items()}
    load_network_weights(with_ds, tmp_path / "plain.pt")  # keeps its own deep-supervision modules
    for key, value in with_ds.backbone.ds_precls.state_dict().items():
        assert torch.equal(value, own[key])
    torch.testing.assert_close(with_ds.backbone.conv1.weight, without.backbone.conv1.weight)
    with pytest.raises(CheckpointError, match="base_channels 4"):  # other keys stay strict
        load_network_weights(tiny_net(base_channels=8, deep_supervision=1), tmp_path / "ds.pt")
    with pytest.raises(ValueError, match="deep_supervision must be 0-3"):
        DoDNet(deep_supervision=4)


def test_image_to_head_reads_each_voxels_own_intensity():
    """With the pre-segmentation map at zero and heads from the task alone (task_heads start), a change of one
    voxel's intensity changes the logits of that voxel only: the image reaches the 1x1x1 heads directly."""
    net = tiny_net(image_to_head=True, controller_init="task_heads")
    assert net.head.in_channels == 8 + 1 and tiny_net().head.in_channels == 8
    with torch.no_grad():
        net.backbone.precls_conv[2].weight.zero_()
        net.backbone.precls_conv[2].bias.zero_()
    x = torch.randn(1, 1, *SHAPE)
    changed = x.clone()
    changed[0, 0, 5, 6, 7] += 3.0
    with torch.no_grad():
        diff = (net(changed, torch.tensor([0])) - net(x, torch.tensor([0]))).abs().amax(dim=1)[0]
        assert diff[5, 6, 7] > 0 and float(diff.sum()) == pytest.approx(float(diff[5, 6, 7]))
        torch.testing.assert_close(torch.jit.script(net)(x), net(x))
    net = tiny_net(image_to_head=True, deep_supervision=2).train()  # the lower levels read the pooled image
    assert [tuple(o.shape) for o in net(x, torch.tensor([2]))][1:] == [(1, 2, 16, 16, 8), (1, 2, 8, 8, 4)]


def test_image_to_head_given_as_a_string_sizes_the_heads_by_its_meaning():
    assert tiny_net(image_to_head="false").head.in_channels == 8
    assert tiny_net(image_to_head="true").head.in_channels == 9


def test_local_contrast_is_the_voxel_minus_the_mean_of_its_box_inside_the_image():
    """Three 1-D box sums equal the k x k x k box mean with the outside of the image left out of the count, also
    on an axis shorter than the box."""
    x = torch.randn(2, 1, 9, 8, 7, dtype=torch.float64)
    for kernel in (3, 5):
        box = F.avg_pool3d(x, kernel, stride=1, padding=kernel // 2, count_include_pad=False)
        torch.testing.assert_close(local_contrast(x, kernel), x - box)
    short = torch.randn(1, 1, 8, 8, 4, dtype=torch.float64)
    means = torch.stack(
        [
            short[0, 0, max(0, i - 3) : i + 4, max(0, j - 3) : j + 4, max(0, k - 3) : k + 4].mean()
            for i in range(8)
            for j in range(8)
            for k in range(4)
        ]
    ).reshape(8, 8, 4)
    torch.testing.assert_close(local_contrast(short, 7)[0, 0], short[0, 0] - means)
    flat = torch.full((1, 1, 8, 8, 8), 0.7)
    assert float(local_contrast(flat, 7).abs().max()) < 1e-6  # a uniform region has no contrast, edges included


def test_contrast_to_head_gives_the_heads_a_voxels_contrast_to_its_surroundings():
    """With the pre-segmentation map at zero, a brighter voxel changes the logits inside its 3x3x3 box only
    (its own contrast and its neighbours' box means), and the network scripts with the option."""
    net = tiny_net(contrast_to_head=[3], controller_init="task_heads")
    assert net.head.in_channels == 8 + 1 and tiny_net(image_to_head=True, contrast_to_head="3,7").head.in_channels == 11
    with torch.no_grad():
        net.backbone.precls_conv[2].weight.zero_()
        net.backbone.precls_conv[2].bias.zero_()
    x = torch.zeros(1, 1, *SHAPE)
    changed = x.clone()
    changed[0, 0, 5, 6, 7] = 3.0
    with torch.no_grad():
        diff = (net(changed, torch.tensor([0])) - net(x, torch.tensor([0]))).abs().amax(dim=1)[0]
        box = torch.zeros_like(diff, dtype=torch.bool)
        box[4:7, 5:8, 6:9] = True
        assert diff[5, 6, 7] > 0 and float(diff[~box].abs().max()) == 0.0
        y = torch.randn(1, 1, *SHAPE)
        torch.testing.assert_close(torch.jit.script(net)(y), net(y))
    net = tiny_net(contrast_to_head=[3, 5], deep_supervision=2).train()  # lower levels: contrast of the pooled image
    assert [tuple(o.shape) for o in net(x, torch.tensor([2]))][1:] == [(1, 2, 16, 16, 8), (1, 2, 8, 8, 4)]


def test_contrast_for_bf16_heads_is_computed_in_float32():
    """Under bf16 autocast the pre-segmentation map is bf16; the contrast is summed in float32 and only then cast
    (bf16 box sums of a CT window lose a small lesion's contrast)."""
    net = tiny_net(contrast_to_head=[7])
    image = 0.9 + 0.01 * torch.randn(1, 1, 16, 16, 8)
    preseg = torch.zeros(1, 8, 16, 16, 8, dtype=torch.bfloat16)
    contrast = net.head_input(preseg, image)[:, 8:]
    assert contrast.dtype == torch.bfloat16
    torch.testing.assert_close(contrast, local_contrast(image, 7).to(torch.bfloat16))
    assert float((contrast.float() - local_contrast(image.bfloat16(), 7).float()).abs().max()) > 0.001


@pytest.mark.parametrize("value", [[2], [1], "3,x", [3.5], "4"])
def test_contrast_to_head_refuses_a_box_size_that_is_not_odd_and_at_least_3(value):
    with pytest.raises(ValueError, match="contrast_to_head must list odd box sizes >= 3"):
        DoDNet(contrast_to_head=value)
    assert contrast_kernels("[3, 7]") == contrast_kernels((3, 7)) == [3, 7] and contrast_kernels("[]") == []


def test_bad_contrast_or_deep_supervision_values_are_user_errors_that_monai_bundle_run_prints_as_one_line():
    from scripts.cli_errors import user_error_exit

    for kwargs in (dict(contrast_to_head=[4]), dict(deep_supervision=5), dict(blocks=(1, 0, 2, 2, 2))):
        with pytest.raises(UsageError) as info:
            DoDNet(**kwargs)
        wrapped = RuntimeError("Failed to instantiate component")  # as MONAI's config parser wraps it
        wrapped.__cause__ = info.value
        assert user_error_exit(wrapped) == (info.value, 2)
