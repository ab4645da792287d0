"""Validation Dice per structure (TaskDiceMetric/TaskDiceHandler) and the resume checkpoint finder."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine

from scripts.evaluation.validation_dice import TaskDiceHandler, TaskDiceMetric, structure_metric_names
from scripts.tasks import merged_structures
from scripts.training.checkpoints import latest_checkpoint

NAMES = [name for _, name, _, _, _ in merged_structures()]


def _masks(organ_pred, organ_ref, tumor_pred, tumor_ref):
    """(1, 2, 4, 1, 1) prediction and reference from 4-voxel organ/tumor patterns (None: unlabeled)."""

    def channel(values, fill=0.0):
        return torch.tensor(values if values is not None else [fill] * 4, dtype=torch.float32).reshape(1, 1, 4, 1, 1)

    pred = torch.cat([channel(organ_pred), channel(tumor_pred)], dim=1)
    ref = torch.cat([channel(organ_ref, -1.0), channel(tumor_ref, -1.0)], dim=1)
    return pred, ref


def test_scores_land_on_the_task_structures():
    metric = TaskDiceMetric()
    # liver: organ Dice 2*2/(3+2) = 0.8, tumor Dice 1
    pred, ref = _masks([1, 1, 1, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0])
    scores = metric(pred, ref, task_id=torch.tensor([0]))
    assert scores.shape == (1, 11)
    assert scores[0, NAMES.index("liver")].item() == pytest.approx(0.8)
    assert scores[0, NAMES.index("liver tumor")].item() == pytest.approx(1.0)
    assert sum(not math.isnan(v) for v in scores[0].tolist()) == 2
    # colon: organ unlabeled (-1) -> only the colon tumor is scored
    pred, ref = _masks([1, 1, 1, 1], None, [1, 0, 0, 0], [0, 1, 0, 0])
    scores = metric(pred, ref, task_id=torch.tensor([4]))
    assert scores[0, NAMES.index("colon tumor")].item() == 0.0
    assert sum(not math.isnan(v) for v in scores[0].tolist()) == 1


def test_both_empty_is_left_out_and_means_are_per_structure_first():
    metric = TaskDiceMetric()
    metric(*_masks([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]), task_id=torch.tensor([6]))  # spleen 1.0
    metric(*_masks([1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]), task_id=torch.tensor([1]))  # kidney 0
    metric(*_masks([1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]), task_id=torch.tensor([1]))  # kidney 2/3
    per = metric.per_structure()
    assert per[NAMES.index("spleen")].item() == pytest.approx(1.0)
    assert per[NAMES.index("kidney")].item() == pytest.approx(1 / 3)
    assert math.isnan(per[NAMES.index("kidney tumor")].item())  # empty in both prediction and reference
    assert metric.aggregate().item() == pytest.approx((1.0 + 1 / 3) / 2)


def test_bad_inputs():
    metric = TaskDiceMetric()
    pred, ref = _masks([1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0])
    with pytest.raises(ValueError, match="needs the task_id"):
        metric(pred, ref)
    with pytest.raises(ValueError, match="2 task ids for a batch of 1"):
        metric(pred, ref, task_id=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \(B, 2, \.\.\.\)"):
        metric(pred[:, :1], ref[:, :1], task_id=torch.tensor([0]))


def test_handler_reads_task_ids_from_the_batch_and_reports_scored_structures():
    cases = [
        (_masks([1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]), 0),  # liver 1.0, liver tumor 2/3
        (_masks([1, 1, 1, 1], None, [0, 0, 1, 1], [0, 0, 1, 1]), 5),  # lung tumor 1.0
    ]

    def step(engine, batch):  # decollated output, as SupervisedEvaluator leaves it
        (pred, ref), task = batch
        engine.state.batch = [{"task_id": torch.tensor(task)}]
        return [{"pred": pred[0], "label": ref[0]}]

    engine = Engine(step)
    TaskDiceHandler().attach(engine, "val_mean_dice")
    engine.run(cases, max_epochs=1)
    metrics = engine.state.metrics
    assert metrics["val_dice_liver"] == pytest.approx(1.0)
    assert metrics["val_dice_liver_tumor"] == pytest.approx(2 / 3)
    assert metrics["val_dice_lung_tumor"] == pytest.approx(1.0)
    assert metrics["val_mean_dice"] == pytest.approx((1.0 + 2 / 3 + 1.0) / 3)
    assert "val_dice_spleen" not in metrics
    assert engine.state.metric_details["val_mean_dice"].shape == (2, 11)
    assert structure_metric_names()[0] == "val_dice_liver" and len(structure_metric_names()) == 11


def test_latest_checkpoint_skips_incomplete_files(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    for epoch in (2, 10):
        torch.save({"epoch": epoch}, tmp_path / f"checkpoint_epoch={epoch}.pt")
    torch.save({}, tmp_path / "model.pt")
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")  # numeric, not text order
    data = (tmp_path / "checkpoint_epoch=10.pt").read_bytes()
    (tmp_path / "checkpoint_epoch=11.pt").write_bytes(data[: len(data) // 2])  # killed while saving
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint_epoch=10.pt")
