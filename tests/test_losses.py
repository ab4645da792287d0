"""PartialLabelDiceBCELoss: Dice + BCE on labeled (sample, channel) pairs only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scripts.training.losses import PartialLabelDiceBCELoss


def _reference(logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The original formula for one sample and channel, written out with plain torch ops."""
    p = torch.sigmoid(logit)
    dice = 1 - 2 * (p * target).sum() / (p.sum() + target.sum() + 1)
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).mean()
    return dice + bce


def _batch(seed=0, shape=(2, 2, 6, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g)
    target = (torch.rand(shape, generator=g) > 0.6).float()
    return logits, target


def test_matches_the_published_formula():
    logits, target = _batch()
    target[1, 0] = -1  # sample 1 does not label the organ
    loss = PartialLabelDiceBCELoss()(logits, target)
    organ = _reference(logits[0, 0], target[0, 0])
    tumor = (_reference(logits[0, 1], target[0, 1]) + _reference(logits[1, 1], target[1, 1])) / 2
    assert torch.allclose(loss, (organ + tumor) / 2, atol=1e-5)


def test_unlabeled_channel_gets_exactly_zero_gradient():
    logits, target = _batch(1)
    target[0, 1] = -1  # sample 0: tumor unlabeled (spleen-like)
    target[1, 0] = -1  # sample 1: organ unlabeled (colon-like)
    logits.requires_grad_(True)
    loss = PartialLabelDiceBCELoss()(logits, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.count_nonzero(logits.grad[0, 1]) == 0
    assert torch.count_nonzero(logits.grad[1, 0]) == 0
    assert torch.count_nonzero(logits.grad[0, 0]) > 0 and torch.count_nonzero(logits.grad[1, 1]) > 0


def test_unlabeled_logits_do_not_change_the_loss():
    logits, target = _batch(2)
    target[1, 1] = -1
    other = logits.clone()
    other[1, 1] = 1000.0  # extreme values where the channel is unlabeled
    loss_fn = PartialLabelDiceBCELoss()
    assert torch.equal(loss_fn(logits, target), loss_fn(other, target))


def test_channel_without_labeled_sample_is_dropped():
    logits, target = _batch(3)
    target[:, 0] = -1  # no sample labels the organ (a colon + lung batch)
    loss = PartialLabelDiceBCELoss()(logits, target)
    tumor = (_reference(logits[0, 1], target[0, 1]) + _reference(logits[1, 1], target[1, 1])) / 2
    assert torch.allclose(loss, tumor, atol=1e-5)


def test_all_unlabeled_batch_raises_a_clear_error():
    logits, target = _batch(4)
    target[:] = -1
    with pytest.raises(ValueError, match="no labeled channel in this batch"):
        PartialLabelDiceBCELoss()(logits, target)


def test_partly_marked_channel_is_rejected():
    logits, target = _batch(5)
    target[0, 1] = -1
    target[0, 1, :2] = 0  # e.g. a pad with 0 after mapping
    with pytest.raises(ValueError, match=r"pairs \[\(0, 1\)\] mix unlabeled"):
        PartialLabelDiceBCELoss()(logits, target)


def test_empty_foreground_and_half_precision_give_finite_values():
    logits, target = _batch(6)
    target[:] = 0  # labeled, but no foreground anywhere
    half = logits.half().requires_grad_(True)
    loss = PartialLabelDiceBCELoss()(half, target)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(half.grad.float()).all()


def test_weights_and_shape_check():
    logits, target = _batch(7)
    dice_only = PartialLabelDiceBCELoss(bce_weight=0.0)(logits, target)
    bce_only = PartialLabelDiceBCELoss(dice_weight=0.0)(logits, target)
    both = PartialLabelDiceBCELoss()(logits, target)
    assert torch.allclose(dice_only + bce_only, both, atol=1e-6)
    assert torch.allclose(bce_only, F.binary_cross_entropy_with_logits(logits, target), atol=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        PartialLabelDiceBCELoss()(logits, target[:, :1])


def test_pos_weight_weighs_the_foreground_voxels_of_the_bce_term():
    logits, target = _batch(5)
    target[1, 0] = -1
    loss = PartialLabelDiceBCELoss(dice_weight=0.0, pos_weight=20.0)(logits, target)

    def weighted_bce(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(x)
        return -(20.0 * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()

    organ = weighted_bce(logits[0, 0], target[0, 0])
    tumor = (weighted_bce(logits[0, 1], target[0, 1]) + weighted_bce(logits[1, 1], target[1, 1])) / 2
    assert torch.allclose(loss, (organ + tumor) / 2, atol=1e-5)
    plain = PartialLabelDiceBCELoss()
    assert torch.equal(PartialLabelDiceBCELoss(pos_weight=1.0)(logits, target), plain(logits, target))
    for bad in (0.0, -3.0):
        with pytest.raises(ValueError, match="pos_weight"):
            PartialLabelDiceBCELoss(pos_weight=bad)


def test_max_pool_deep_supervision_keeps_small_structures_and_the_unlabeled_marker():
    """A one-voxel lesion is foreground at every lower level (MONAI's nearest sampling loses it at 1/4); a channel
    filled with the unlabeled marker stays unlabeled; the level losses are weighted 1, 0.5, 0.25 as MONAI's."""
    from monai.losses import DeepSupervisionLoss

    from scripts.training.losses import MaxPoolDeepSupervisionLoss

    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, 5, 6, 1] = 1.0
    target[0, 1] = -1.0
    seen = []

    class Recorder(PartialLabelDiceBCELoss):
        def forward(self, input, target):
            seen.append(target)
            return super().forward(input, target)

    levels = [torch.randn(1, 2, 8 // 2**k, 8 // 2**k, 8 // 2**k) for k in range(3)]
    total = MaxPoolDeepSupervisionLoss(Recorder())(levels, target)
    assert [float(t[0, 0].sum()) for t in seen] == [1.0, 1.0, 1.0] and all(bool((t[0, 1] == -1).all()) for t in seen)
    assert seen[2][0, 0, 1, 1, 0] == 1.0  # the lesion's own cell at 1/4
    plain = PartialLabelDiceBCELoss()
    expected = sum(w * plain(x, t) for w, x, t in zip((1.0, 0.5, 0.25), levels, seen))
    torch.testing.assert_close(total, expected)
    seen.clear()
    DeepSupervisionLoss(Recorder())(levels, target)
    assert float(seen[2][0, 0].sum()) == 0.0  # why: nearest sampling drops it


def test_meta_tensor_target_gives_the_same_plain_loss_and_gradient():
    """MONAI's loaders deliver MetaTensor targets; the loss computes on plain tensors (no metadata through each
    step) with the same value and gradient."""
    from monai.data import MetaTensor

    logits, target = _batch(seed=3)
    plain_in = logits.clone().requires_grad_()
    meta_in = logits.clone().requires_grad_()
    expected = PartialLabelDiceBCELoss()(plain_in, target)
    loss = PartialLabelDiceBCELoss()(meta_in, MetaTensor(target, meta={"filename_or_obj": "case.nii.gz"}))
    assert type(loss) is torch.Tensor
    torch.testing.assert_close(loss, expected)
    expected.backward()
    loss.backward()
    torch.testing.assert_close(meta_in.grad, plain_in.grad)


def test_structures_average_weighs_every_labeled_sample_channel_pair_alike():
    """A lung-like sample (tumor only) next to a liver-like one (organ and tumor): "channels" weighs the lung tumor
    1/4 and the liver organ 1/2; "structures" weighs each of the three labeled structures 1/3."""
    logits, target = _batch(8)
    target[0, 0] = -1  # sample 0 labels only its tumor
    lung_tumor = _reference(logits[0, 1], target[0, 1])
    liver_organ, liver_tumor = _reference(logits[1, 0], target[1, 0]), _reference(logits[1, 1], target[1, 1])
    channels = PartialLabelDiceBCELoss()(logits, target)
    structures = PartialLabelDiceBCELoss(average="structures")(logits, target)
    assert torch.allclose(channels, (liver_organ + (lung_tumor + liver_tumor) / 2) / 2, atol=1e-5)
    assert torch.allclose(structures, (lung_tumor + liver_organ + liver_tumor) / 3, atol=1e-5)
    full = _batch(9)
    assert torch.allclose(  # every pair labeled: the two averages agree
        PartialLabelDiceBCELoss(average="structures", pos_weight=20.0)(*full),
        PartialLabelDiceBCELoss(pos_weight=20.0)(*full),
        atol=1e-6,
    )
    logits.requires_grad_(True)
    target[1, 1] = -1
    PartialLabelDiceBCELoss(average="structures")(logits, target).backward()
    assert torch.count_nonzero(logits.grad[0, 0]) == 0 and torch.count_nonzero(logits.grad[1, 1]) == 0
    with pytest.raises(ValueError, match="average must be one of"):
        PartialLabelDiceBCELoss(average="voxels")


def test_a_bad_average_is_a_user_error_that_monai_bundle_run_prints_as_one_line():
    from scripts.cli_errors import UsageError, user_error_exit

    with pytest.raises(UsageError) as info:
        PartialLabelDiceBCELoss(average="voxels")
    wrapped = RuntimeError("Failed to instantiate component")  # as MONAI's config parser wraps it
    wrapped.__cause__ = info.value
    assert user_error_exit(wrapped) == (info.value, 2)
