"""The demo's scoring and table (the full demo run is a benchmark: benchmarks/demo_benchmark.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.demo import format_table, organ_mean_dice, score_structure_masks
from scripts.tasks import TASKS


def _save(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.eye(4)), str(path))
    return path


def test_structure_masks_are_scored_with_the_source_rules(tmp_path: Path) -> None:
    label = np.zeros((10, 10, 4), np.uint8)
    label[2:8, 2:8] = 1
    label[4:6, 4:6] = 2  # tumor inside the liver: the source's organ channel (>= 1) includes it
    organ = np.zeros_like(label)
    organ[2:8, 2:7] = 1
    tumor = (label == 2).astype(np.uint8)
    _save(tmp_path / "case_liver_mask.nii.gz", organ)
    _save(tmp_path / "case_liver_tumor_mask.nii.gz", tumor)
    _save(tmp_path / "case_spleen_mask.nii.gz", np.ones_like(label))  # another task's structure does not count
    scores = score_structure_masks(tmp_path, "case", _save(tmp_path / "lab.nii.gz", label), "liver")
    assert scores == {"liver": pytest.approx(2 * 30 * 4 / (30 * 4 + 36 * 4)), "liver tumor": pytest.approx(1.0)}
    _save(tmp_path / "case_colon_tumor_mask.nii.gz", np.zeros_like(label))
    colon = score_structure_masks(tmp_path, "case", _save(tmp_path / "l2.nii.gz", label * 0), "colon")
    assert colon == {"colon tumor": None}  # both empty: undefined
    with pytest.raises(ValueError, match="shape"):
        _save(tmp_path / "c2_colon_tumor_mask.nii.gz", np.zeros((5, 10, 4), np.uint8))
        score_structure_masks(tmp_path, "c2", tmp_path / "lab.nii.gz", "colon")
    with pytest.raises(FileNotFoundError, match="save_masks"):
        score_structure_masks(tmp_path, "missing", tmp_path / "lab.nii.gz", "liver")


def test_table_lists_every_task_and_the_organ_mean() -> None:
    structures = {}
    for i, spec in enumerate(TASKS):
        if spec.labels_organ:
            structures[spec.organ_name] = {"dice_mean": 0.8 + 0.02 * i, "cases": 2}
        if spec.labels_tumor:
            structures[spec.tumor_name] = {"dice_mean": 0.5, "cases": 2}
    summary = {"structures": structures, "table6_average": {"dice": 0.6, "dice_classes": 11}}
    organs = [0.8 + 0.02 * i for i, s in enumerate(TASKS) if s.labels_organ]
    assert organ_mean_dice(summary) == pytest.approx(np.mean(organs))
    table = format_table(summary, {"case": "x.nii.gz", "task": "liver", "dice": {"liver": 0.9}})
    for spec in TASKS:
        assert spec.display in table
    assert table.count("unlabeled") == 3  # colon and lung organs, spleen tumor
    assert f"{np.mean(organs):.3f}" in table and "over the 5 tasks with organ labels" in table
    assert "held-out inference (x.nii.gz, task liver" in table
    failed = format_table(summary, {"case": "x.nii.gz", "task": "liver", "error": "boom"})
    assert "FAILED: boom" in failed


def test_demo_inference_runs_at_the_demo_spacing_and_window(tmp_path: Path) -> None:
    """inference.json resamples to its own pixdim; the demo's network was trained at demo.json's, so the held-out
    inference (and the overlap sweep) must get demo.json's pixdim and window, also when a flag changes them."""
    from scripts.demo import DEMO_CONFIG, demo_inference_overrides, demo_overrides

    demo = json.loads(DEMO_CONFIG.read_text())
    overrides = demo_inference_overrides(tmp_path / "model.pt")
    assert overrides["pixdim"] == demo["pixdim"] and overrides["patch_size"] == demo["patch_size"]
    assert overrides["network_def#image_to_head"] is True  # the heads' size depends on it; deep supervision's not
    assert overrides["network_def#contrast_to_head"] == demo["network_def#contrast_to_head"] != []
    assert "deep_supervision" not in overrides
    inference = json.loads((DEMO_CONFIG.parent / "inference.json").read_text())
    changed = demo_inference_overrides(tmp_path / "model.pt", demo_overrides(pixdim=[1.05, 1.05, 1.5]))
    assert changed["pixdim"] == [1.05, 1.05, 1.5] != inference["pixdim"]


@pytest.mark.parametrize(
    "flag, value",
    [
        ("pixdim", "1.0"),
        ("pixdim", "[0.8, 0.8]"),
        ("patch_size", "[64, 0, 32]"),
        ("image_to_head", "maybe"),
        ("contrast_to_head", "4"),
        ("contrast_to_head", "3,x"),
        ("deep_supervision", "5"),
        ("epochs", "many"),
    ],
)
def test_bad_vector_flag_is_one_line_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, value: str
) -> None:
    from scripts.demo import main

    with pytest.raises(SystemExit) as info:
        main([f"--{flag}", value, "--output_dir", str(tmp_path / "demo")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"dodnet-demo: error: --{flag} ") and "Traceback" not in err
    assert not (tmp_path / "demo").exists()


def test_demo_json_merged_on_train_json_gives_the_demo_settings() -> None:
    from monai.bundle import ConfigParser

    from scripts.demo import DEMO_CONFIG, DEMO_DEFAULTS, demo_overrides, demo_settings

    parser = ConfigParser()
    parser.read_config([str(DEMO_CONFIG.parent / "train.json"), str(DEMO_CONFIG)])
    assert parser.get("_desc_", "").startswith("Merged on train.json")
    network = parser.get_parsed_content("network_def")
    assert network.backbone is not None and parser.get_parsed_content("network_def#base_channels") == 8
    assert parser.get_parsed_content("optimizer#_target_") == "torch.optim.Adam"
    assert parser.get("train#augmentations") == []
    assert network.controller.fc.weight[:, : network.backbone.feature_channels].abs().max() == 0  # task_heads
    assert parser.get_parsed_content("loss").bce_weight == 0.3 and parser.get_parsed_content("loss").pos_weight == 20
    assert network.image_to_head and network.backbone.deep_supervision == 2  # the two options the demo relies on
    assert type(parser.get_parsed_content("train#trainer#loss_function")).__name__ == "DeepSupervisionLoss"
    assert parser.get_parsed_content("synth_options") == {
        "num_per_task": 24,
        "num_val_per_task": 2,
        "num_test_per_task": 4,
        "seed": 0,
        "workers": 2,
    }
    settings = demo_settings()
    assert {k: settings[k] for k in DEMO_DEFAULTS} == DEMO_DEFAULTS  # what run_demo reports is demo.json's
    assert settings["steps_per_epoch"] == 84 and settings["optimizer"] == "torch.optim.Adam"
    assert settings["epochs"] == parser.get_parsed_content("epochs")
    changed = demo_settings(demo_overrides(epochs=3, base_channels=4, num_per_task=2, learning_rate=0.01))
    assert (changed["epochs"], changed["base_channels"], changed["num_per_task"]) == (3, 4, 2)
    assert changed["learning_rate"] == 0.01 and changed["steps_per_epoch"] == 7
    with pytest.raises(TypeError, match="unknown demo settings"):
        demo_overrides(width=4)
    # fire passes "--image_to_head false" as a string: it must switch the option off, not on
    assert demo_overrides(image_to_head="false", weight_std="False") == {
        "network_def#image_to_head": False,
        "network_def#weight_std": False,
    }


def test_demo_post_rules_replace_the_published_tumor_cut_off() -> None:
    import torch

    from scripts.demo import RuleTaskPostProcessd, _post_rule_overrides, demo_settings
    from scripts.inference import TaskPostProcessd

    rules = demo_settings()["post_rules"]
    assert rules["liver"]["tumor_min_voxels"] < 50
    masks = torch.zeros((2, 16, 16, 8), dtype=torch.uint8)
    masks[0, 2:14, 2:14, 1:7] = 1
    masks[1, 4:7, 4:7, 2:5] = 1  # a 27-voxel tumor inside the liver: the published rule drops it
    item = {"pred": masks.clone(), "task_id": torch.tensor([0])}
    assert TaskPostProcessd(task_id_key="task_id")(dict(item, pred=masks.clone()))["pred"][1].sum() == 0
    kept = RuleTaskPostProcessd(rules=rules, task_id_key="task_id")(item)["pred"]
    assert int(kept[1].sum()) == 27 and int(kept[0].sum()) == 12 * 12 * 6
    assert RuleTaskPostProcessd(rules=rules, tasks="spleen").rule(6) == TASKS[6].post  # unlisted: published
    for config, node in (("evaluate.json", "task_postprocessing"), ("inference.json", "postprocessing_steps#")):
        overrides = _post_rule_overrides(config, rules)
        targets = [k for k, v in overrides.items() if v == "scripts.demo.RuleTaskPostProcessd"]
        assert len(targets) == 1 and targets[0].startswith(node), overrides


@pytest.mark.slow
def test_tiny_demo_run_is_quiet_and_logs_to_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """One epoch of a width-4 network on 21 MOTS-synth volumes, through all four steps."""
    from scripts.demo import run_demo

    result = run_demo(
        output_dir=str(tmp_path / "demo"),
        num_per_task=1,
        num_val_per_task=1,
        num_test_per_task=1,
        epochs=1,
        val_interval=1,
        base_channels=4,
        patch_size=[32, 32, 16],
        threads=1,
    )
    out, err = capsys.readouterr()
    log = (tmp_path / "demo" / "demo.log").read_text()
    assert "Iter: 1/4" in log and "train_loss" in log  # StatsHandler's per-iteration lines: in the file only
    assert "has no __module__" not in log and "nvImageCodec" not in log  # library noise stays out of the log
    assert "Iter:" not in out and "train_loss" not in out and " - INFO - " not in out
    assert "epoch 1/1: validation Dice" in out
    assert "organ Dice averaged over the 5 tasks" in out and "tumor Dice averaged over the 6 tumor classes" in out
    assert "held-out inference (liver_test_000.nii.gz" in out and "FAILED" not in out
    for step in ("generate", "train", "evaluate"):
        assert f"{step}:" in err  # one progress bar per step
    assert "Epoch [1/1]" not in err  # Ignite's per-epoch bar is replaced by the demo's
    assert "Loading dataset" not in err  # nor are CacheDataset's bars shown
    assert result["settings"]["epochs"] == 1 and result["settings"]["base_channels"] == 4
    assert set(result["times_s"]) == {"generate", "train", "evaluate", "infer", "total"}
    assert result["log"] == "demo.log" and 0.0 <= result["tumor_mean_dice"] <= 1.0
    assert result["held_out"]["dice"].keys() == {"liver", "liver tumor"}

    # benchmarks/lesion_report.py rebuilds the run's network from its settings and loads its weights (strict)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from lesion_report import lesion_report

    rows = lesion_report(tmp_path / "demo", ["liver"])
    assert [row["case"] for row in rows] == ["liver_test_000.nii.gz"] and 0.0 <= rows[0]["dice"] <= 1.0
    assert rows[0]["lesions"] and all(lesion["voxels"] > 0 for lesion in rows[0]["lesions"])

    # the trained network for dodnet-segment: the args file the demo wrote, the same maps as the demo's inference
    from scripts.demo import INFERENCE_ARGS
    from scripts.inference.cli import segment

    assert f"--args_file {tmp_path / 'demo' / INFERENCE_ARGS}" in out
    image = tmp_path / "demo" / result["datalist"]
    image = image.parent / json.loads(image.read_text())["test"][0]["image"]
    summary = segment(
        str(image), str(tmp_path / "seg"), args_file=str(tmp_path / "demo" / INFERENCE_ARGS), progress=False
    )
    assert not summary["failed"]
    ours = nib.load(str(tmp_path / "seg" / f"{image.name[:-7]}_seg.nii.gz")).get_fdata()
    demos = nib.load(result["held_out"]["label_map"]).get_fdata()
    assert ours.shape == demos.shape and (ours == demos).all()
