"""Post-processing rules, merging precedence, report and preview on constructed masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scripts.inference.postprocessing import MergeTaskLabelsd, TaskPostProcessd, apply_post_rule, merge_task_masks
from scripts.inference.preview import preview_slices, render_preview
from scripts.inference.report import case_report, voxel_volume_ml
from scripts.tasks import MERGE_PRECEDENCE, merge_precedence, merged_label_colors, merged_label_names, task_by_name

SHAPE = (1, 40, 40, 20)


def box(mask: torch.Tensor, h: slice, w: slice, d: slice) -> None:
    mask[0, h, w, d] = 1


def blank() -> torch.Tensor:
    return torch.zeros(SHAPE, dtype=torch.uint8)


def test_liver_rule_largest_organ_tumor_inside_and_small_tumors_dropped():
    organ, tumor = blank(), blank()
    box(organ, slice(0, 20), slice(0, 20), slice(0, 10))  # 4000 voxels, the liver
    box(organ, slice(30, 34), slice(30, 34), slice(0, 4))  # 64-voxel stray component
    box(tumor, slice(2, 7), slice(2, 7), slice(2, 4))  # 50 voxels inside: dropped (<= 50)
    box(tumor, slice(10, 13), slice(10, 27), slice(2, 3))  # 51 voxels, 24 of them outside the organ
    box(tumor, slice(10, 13), slice(2, 19), slice(5, 6))  # 51 voxels inside: kept
    box(tumor, slice(36, 39), slice(0, 3), slice(0, 3))  # outside the organ: removed
    out_organ, out_tumor = apply_post_rule(organ, tumor, task_by_name("liver").post)
    expected_organ = blank()
    box(expected_organ, slice(0, 20), slice(0, 20), slice(0, 10))
    assert torch.equal(out_organ, expected_organ)
    expected_tumor = blank()
    box(expected_tumor, slice(10, 13), slice(2, 19), slice(5, 6))
    # the straddling component keeps its 3 x 10 inside part (30 voxels <= 50: dropped as well)
    assert torch.equal(out_tumor, expected_tumor)


def test_kidney_rule_two_largest_organs_and_largest_tumor():
    organ, tumor = blank(), blank()
    box(organ, slice(0, 10), slice(0, 10), slice(0, 10))  # 1000
    box(organ, slice(20, 29), slice(0, 10), slice(0, 10))  # 900
    box(organ, slice(0, 5), slice(20, 25), slice(0, 5))  # 125: third, removed
    box(tumor, slice(1, 3), slice(1, 3), slice(1, 3))  # 8 voxels
    box(tumor, slice(21, 25), slice(1, 5), slice(1, 5))  # 64 voxels: the largest, kept
    box(tumor, slice(1, 4), slice(21, 24), slice(1, 4))  # inside the removed third organ: removed
    out_organ, out_tumor = apply_post_rule(organ, tumor, task_by_name("kidney").post)
    assert out_organ.sum() == 1900 and out_organ[0, 0:5, 20:25, 0:5].sum() == 0
    assert out_tumor.sum() == 64 and out_tumor[0, 21:25, 1:5, 1:5].all()


@pytest.mark.parametrize("name", ["colon", "lung"])
def test_colon_and_lung_keep_the_largest_tumor_only(name):
    organ, tumor = blank(), blank()
    box(tumor, slice(0, 3), slice(0, 3), slice(0, 3))
    box(tumor, slice(10, 15), slice(10, 15), slice(5, 10))
    out_organ, out_tumor = apply_post_rule(organ, tumor, task_by_name(name).post)
    assert out_tumor.sum() == 125 and out_organ.sum() == 0


def test_spleen_largest_component_and_hepatic_vessel_small_tumor_removal():
    organ, tumor = blank(), blank()
    box(organ, slice(0, 10), slice(0, 10), slice(0, 10))
    box(organ, slice(20, 22), slice(20, 22), slice(0, 2))
    spleen_organ, _ = apply_post_rule(organ, tumor, task_by_name("spleen").post)
    assert spleen_organ.sum() == 1000
    box(tumor, slice(30, 34), slice(30, 34), slice(0, 4))  # 64 voxels outside the vessels: kept (no inside rule)
    box(tumor, slice(25, 27), slice(25, 27), slice(0, 2))  # 8 voxels: dropped
    vessel, vessel_tumor = apply_post_rule(organ, tumor, task_by_name("hepatic_vessel").post)
    assert torch.equal(vessel, organ)  # all vessel components kept
    assert vessel_tumor.sum() == 64


def test_post_processing_switch_and_channel_layout():
    masks = torch.zeros((4, 40, 40, 20), dtype=torch.uint8)
    masks[0, :10, :10, :10] = 1
    masks[0, 30:32, 30:32, :2] = 1  # stray liver component
    masks[2, 30:32, 30:32, :2] = 1  # spleen: single component, untouched
    on = TaskPostProcessd(keys="pred", tasks="liver,spleen")({"pred": masks.clone()})["pred"]
    off = TaskPostProcessd(keys="pred", tasks="liver,spleen", enabled=False)({"pred": masks.clone()})["pred"]
    assert torch.equal(off, masks)
    assert on[0].sum() == 1000 and on[2].sum() == 8
    with pytest.raises(ValueError, match="2K = 2 channels"):
        TaskPostProcessd(keys="pred", tasks="liver")({"pred": masks})


def test_merge_uses_channel_def_ids_and_documented_precedence():
    names = merged_label_names()
    masks = torch.zeros((14, 8, 8, 8), dtype=torch.uint8)
    masks[0, :6] = 1  # liver organ
    masks[4, 2:4] = 1  # hepatic vessel organ inside the liver: vessel wins
    masks[1, 3:5] = 1  # liver tumor over vessel and liver: tumor wins
    masks[8, 7:] = 1  # colon "organ" channel: not a structure, ignored
    masks[9, 7:, :2] = 1  # colon tumor
    label = merge_task_masks(
        masks, [task_by_name(n) for n in ("liver", "kidney", "hepatic vessel", "pancreas", "colon", "lung", "spleen")]
    )
    ids = {v: k for k, v in names.items()}
    assert label.dtype == torch.uint8 and label.shape == (1, 8, 8, 8)
    assert (label[0, :2] == ids["liver"]).all()
    assert (label[0, 2] == ids["hepatic vessel"]).all()
    assert (label[0, 3:5] == ids["liver tumor"]).all()
    assert (label[0, 5] == ids["liver"]).all()
    assert (label[0, 7, :2] == ids["colon tumor"]).all() and (label[0, 7, 2:] == 0).all()
    assert [names[i] for i in merge_precedence()] == list(MERGE_PRECEDENCE)
    merged = MergeTaskLabelsd(keys="pred", tasks="all")({"pred": masks})
    assert torch.equal(merged["pred"], label) and merged["masks"] is masks


def test_report_volumes_and_burden():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[:5] = 1  # 500 liver voxels
    labels[0, :2, :5] = 2  # 10 liver tumor voxels
    affine = np.diag([0.5, 0.8, 2.0, 1.0])
    report = case_report(labels, affine, [task_by_name("liver"), task_by_name("spleen")], case="c")
    unit = 0.5 * 0.8 * 2.0 / 1000
    assert voxel_volume_ml(affine) == pytest.approx(unit)
    assert report["structures"]["liver"] == {"label": 1, "voxels": 490, "volume_ml": pytest.approx(490 * unit)}
    assert report["structures"]["liver tumor"]["volume_ml"] == pytest.approx(10 * unit)
    assert report["structures"]["spleen"]["voxels"] == 0
    assert report["tumor_burden"]["liver"]["burden"] == pytest.approx(10 / 500)
    assert "spleen" not in report["tumor_burden"] and report["case"] == "c"


def test_preview_through_the_largest_structure_with_legend_colors():
    labels = np.zeros((30, 24, 12), dtype=np.uint8)
    labels[5:20, 4:18, 2:9] = 1  # liver, largest cross-section in every slice it spans
    labels[5:20, 4:18, 6] = 1
    labels[2:4, 2:4, 10] = 11  # small spleen
    labels[5:25, 10, 2:9] = 1  # extra liver in coronal slice 10 -> the largest coronal cross-section
    k, j = preview_slices(labels)
    assert j == 10 and 2 <= k <= 8
    image = np.random.default_rng(0).uniform(-1, 1, labels.shape).astype(np.float32)
    png = render_preview(image, labels, (0.8, 0.8, 1.5), volumes_ml={1: 12.5, 11: 0.1})
    pixels = np.asarray(png)
    assert png.mode == "RGB" and png.width == 2 * 30 + 10
    liver_color = np.array(merged_label_colors()[1])
    assert (np.abs(pixels.reshape(-1, 3).astype(int) - liver_color).sum(axis=1) == 0).any()  # legend swatch


def test_task_id_key_applies_the_items_own_task_rule():
    """With task_id_key the (2, H, W, D) masks follow the item's own task (as evaluate.json uses it)."""
    masks = torch.zeros(2, 12, 12, 12, dtype=torch.uint8)
    masks[0, 1:5, 1:5, 1:5] = 1  # large organ component
    masks[0, 8:10, 8:10, 8:10] = 1  # small second organ component
    masks[1, 8:10, 8:10, 8:10] = 1  # tumor outside the large component
    liver = TaskPostProcessd(keys="pred", task_id_key="task_id")({"pred": masks.clone(), "task_id": 0})["pred"]
    assert liver[0, 8:10, 8:10, 8:10].sum() == 0 and liver[0].sum() == 64  # largest organ component only
    assert liver[1].sum() == 0  # tumor outside the organ removed
    kidney = TaskPostProcessd(keys="pred", task_id_key="task_id")({"pred": masks.clone(), "task_id": 1})["pred"]
    assert kidney[0].sum() == 64 + 8  # kidney keeps its two largest organ components
