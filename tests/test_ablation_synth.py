"""benchmarks/ablation_synth.py, the loop that compares demo recipes: its knobs do what they say."""

from __future__ import annotations

import sys

import pytest
import torch
from helpers.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import ablation_synth  # noqa: E402


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory):
    from scripts.data.synth import ensure_mots_synth

    datalist = ensure_mots_synth(tmp_path_factory.mktemp("synth"), num_per_task=1, num_test_per_task=1)
    return ablation_synth._datasets(datalist, (64, 64, 32))


def test_crop_controller_rate_and_curve_points(tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = tiny_data
    net = ablation_synth._network(7, dict(base_channels=4, preseg_channels=8, head_width=8, norm_groups=2))
    assert net.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last_3d)
    shapes = []
    net.backbone.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape[2:])))
    rates = {}
    original_adam = torch.optim.Adam

    def spy_adam(params, **kwargs):
        optimizer = original_adam(params, **kwargs)
        controller = {id(p) for p in net.controller.parameters()}
        for group in optimizer.param_groups:
            rates["controller" if id(group["params"][0]) in controller else "rest"] = group["lr"]
        return optimizer

    monkeypatch.setattr(ablation_synth.torch.optim, "Adam", spy_adam)
    losses = []
    original_loss = ablation_synth.PartialLabelDiceBCELoss
    monkeypatch.setattr(
        ablation_synth, "PartialLabelDiceBCELoss", lambda **kw: losses.append(original_loss(**kw)) or losses[-1]
    )
    steps = []
    recipe = ablation_synth.Recipe(
        crop=(48, 32, 32), controller_lr_scale=0.25, pos_weight=5.0, loss_average="structures"
    )
    seconds = ablation_synth._train(net, train, 3, 2, 1e-3, None, 0.3, recipe, lambda s, t: steps.append((s, t)))
    assert shapes == [(48, 32, 32)] * 3  # every training step saw a crop of the asked size
    assert rates == {"controller": pytest.approx(2.5e-4), "rest": pytest.approx(1e-3)}
    assert [(loss.average, loss.pos_weight) for loss in losses] == [("structures", 5.0)]
    assert [s for s, _ in steps] == [1, 2, 3] and seconds == pytest.approx(steps[-1][1])
    point = ablation_synth._curve_point("dodnet", net, test, 3, seconds, None, logit_stats=True)
    assert set(point) == {"seconds", "organ", "tumor", "dice"}
    assert len(point["dice"]) == 11 and all(0.0 <= d <= 1.0 for d in point["dice"].values())
    assert net.training  # scoring during training leaves the network in training mode
    stats = ablation_synth._logit_stats(net, test)
    assert stats and all(len(v) == 2 for v in stats.values())


def test_threshold_sweep_scores_the_same_logits_at_other_cut_offs(tiny_data) -> None:
    _, test = tiny_data
    torch.manual_seed(0)
    net = ablation_synth._network(7, dict(base_channels=4, preseg_channels=8, head_width=8, norm_groups=2))
    scores = ablation_synth._score({-1: net}, test, False, thresholds=(0.0, -1e9))
    assert scores["logit > 0"] == scores["raw"]  # threshold 0 is the plain score
    everything = scores["logit > -1e+09"]  # every voxel foreground: Dice = 2 |ref| / (|ref| + |volume|)
    expected = {}
    for item in test:
        for channel in range(2):
            ref = item["label"][channel]
            if bool((ref < 0).all()):
                continue
            n, total = float((ref > 0).sum()), float(ref.numel())
            key = (ablation_synth.TASKS[int(item["task_id"])].name, channel)
            expected.setdefault(key, []).append(2 * n / (n + total))
    assert set(everything) == set(expected)
    for key, values in expected.items():
        assert everything[key] == pytest.approx(values, rel=1e-5)
    results = {"dodnet": {"dice": {k: 0.5 for k in expected}, "seconds": 1.0, "threshold_dice": {-1e9: everything}}}
    table = ablation_synth.format_results(results)
    assert "tumor mean, logit > -1e+09" in table and "organ mean, logit > -1e+09" in table


def test_thresholds_flag_rejects_a_bad_value_in_one_line(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ablation_synth.main(["--thresholds=-5,zero"])  # negative values need the = form
    assert exit_info.value.code == 2
    assert "expected comma-separated numbers, got '-5,zero'" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1,0,2,2,2", "1,2", "0,x"])
def test_blocks_flag_rejects_a_bad_value_in_one_line_before_any_data_is_made(value, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ablation_synth.main(["--blocks", value, "--cache_dir", "/nonexistent/never-made"])
    assert exit_info.value.code == 2
    assert "argument --blocks:" in capsys.readouterr().err
    assert ablation_synth._blocks("0,2,2,2,2") == [0, 2, 2, 2, 2]
