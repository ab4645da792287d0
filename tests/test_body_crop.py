"""The body crop: boxes around the body, whole grid for empty or full images, and an exact geometric round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from scripts.data.body_crop import BodyCropd, body_bounding_box, hu_to_scaled

SHAPE = (60, 52, 20)


def _ct(body_box, table_box=None) -> torch.Tensor:
    """A (1, H, W, D) image in the chain's [-1, 1] scale: air -1, a body block at 0, an optional table block."""
    image = torch.full((1, *SHAPE), -1.0)
    image[(slice(None),) + tuple(slice(a, b) for a, b in body_box)] = 0.0
    if table_box is not None:
        image[(slice(None),) + tuple(slice(a, b) for a, b in table_box)] = 0.2
    return image


def _affine() -> torch.Tensor:
    affine = torch.diag(torch.tensor([0.8, 0.8, 1.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-20.0, 13.0, 7.5], dtype=torch.float64)
    return affine


@pytest.mark.parametrize(
    "body_box",
    [((10, 40), (8, 44), (3, 17)), ((0, 25), (0, 52), (0, 20)), ((30, 60), (40, 52), (15, 20))],
    ids=["inside", "at-low-border", "at-high-border"],
)
def test_box_covers_the_body_and_stays_inside_the_grid(body_box):
    image = _ct(body_box)
    start, end = body_bounding_box(image, threshold=-0.9, downsample=4)
    for axis, (a, b) in enumerate(body_box):
        assert 0 <= start[axis] <= a and b <= end[axis] <= SHAPE[axis]
        assert a - start[axis] < 4 and end[axis] - b < 4  # within one stride of the body


def test_table_apart_from_the_body_is_left_out():
    image = _ct(((10, 40), (8, 44), (3, 17)), table_box=((50, 54), (0, 52), (0, 20)))
    start, end = body_bounding_box(image, threshold=-0.9, downsample=2)
    assert end[0] <= 42 and start[0] >= 8


def test_empty_and_full_images_keep_the_whole_grid():
    for image in (torch.full((1, *SHAPE), -1.0), torch.zeros((1, *SHAPE))):
        assert body_bounding_box(image, threshold=-0.9) == ((0, 0, 0), SHAPE)


def test_hu_threshold_in_the_chain_scale():
    assert hu_to_scaled(-325, (-325, 325)) == -1.0 and hu_to_scaled(325, (-325, 325)) == 1.0
    assert hu_to_scaled(-300, (-325, 325)) == pytest.approx(-1.0 + 50.0 / 650.0)


@pytest.mark.parametrize(
    "body_box",
    [((10, 40), (8, 44), (3, 17)), ((0, 60), (0, 52), (0, 20)), None],
    ids=["body", "body-fills-the-view", "empty"],
)
def test_crop_then_invert_restores_the_geometry_exactly(body_box):
    image = _ct(body_box) if body_box is not None else torch.full((1, *SHAPE), -1.0)
    label = (image > -0.5).to(torch.uint8)
    data = {"image": MetaTensor(image, affine=_affine()), "label": MetaTensor(label, affine=_affine())}
    crop = Compose([BodyCropd(keys=["image", "label"], source_key="image", margin=2)])
    out = crop(data)
    if body_box is not None and body_box != ((0, 60), (0, 52), (0, 20)):
        assert out["image"].shape[1:] != SHAPE  # windows are saved
        # the cropped grid's origin moved by the crop start, spacing unchanged
        start = np.asarray(out["foreground_start_coord"])
        assert torch.allclose(
            out["image"].affine[:3, 3],
            _affine()[:3, :3] @ torch.as_tensor(start, dtype=torch.float64) + _affine()[:3, 3],
        )
    pred = {"image": out["image"], "pred": out["label"].clone()}
    restored = Invertd(keys="pred", transform=crop, orig_keys="image", nearest_interp=True)(pred)["pred"]
    assert tuple(restored.shape[1:]) == SHAPE
    assert torch.allclose(restored.affine, _affine())
    assert torch.equal(restored.as_tensor().to(torch.uint8), label)


def test_disabled_crop_is_a_no_op():
    image = _ct(((10, 40), (8, 44), (3, 17)))
    out = BodyCropd(keys="image", enabled=False)({"image": MetaTensor(image, affine=_affine())})
    assert tuple(out["image"].shape[1:]) == SHAPE


def test_flags_from_the_command_line_switch_the_crop():
    from scripts.data.transforms import ct_preprocessing

    for flag, expected in ((True, True), ("true", True), ("false", False), (False, False)):
        steps = ct_preprocessing(body_crop=flag, load=False)
        assert any(isinstance(s, BodyCropd) for s in steps) is expected
    assert BodyCropd(keys="image", enabled="false").enabled is False
