"""metadata.json: valid against the Model Zoo schema and consistent with the task table."""

from __future__ import annotations

import configparser
import json
import subprocess
import sys

import jsonschema

from scripts.tasks import NUM_TASKS, TASKS, merged_label_names, resolve_task, resolve_tasks


def load_metadata(bundle_root):
    return json.loads((bundle_root / "configs" / "metadata.json").read_text())


def test_metadata_validates_against_schema(bundle_root, schema_path):
    schema = json.loads(schema_path.read_text())
    jsonschema.validate(load_metadata(bundle_root), schema)


def test_monai_verify_metadata_tool(bundle_root, schema_path, tmp_path):
    cmd = [
        sys.executable, "-m", "monai.bundle", "verify_metadata",
        "--meta_file", str(bundle_root / "configs" / "metadata.json"), "--filepath", str(schema_path),
    ]  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "is verified with no error" in result.stdout + result.stderr


def test_version_is_in_changelog(bundle_root):
    meta = load_metadata(bundle_root)
    assert meta["version"] in meta["changelog"]


def test_package_version_equals_bundle_version(bundle_root):
    setup_cfg = configparser.ConfigParser(interpolation=None)
    assert setup_cfg.read(bundle_root.parent / "setup.cfg", encoding="utf-8"), "setup.cfg not found"
    assert setup_cfg["metadata"]["version"] == load_metadata(bundle_root)["version"]


def test_inputs_are_image_then_task_id(bundle_root):
    inputs = load_metadata(bundle_root)["network_data_format"]["inputs"]
    assert list(inputs) == ["image", "task_id"]
    assert inputs["task_id"]["channel_def"] == {str(t.id): t.name.replace("_", " ") for t in TASKS}
    assert inputs["task_id"]["value_range"] == [0, NUM_TASKS - 1]


def test_pred_channel_def_is_the_task_tables_merged_label_map(bundle_root):
    pred = load_metadata(bundle_root)["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 2 * NUM_TASKS
    assert {int(k): v for k, v in pred["channel_def"].items()} == merged_label_names()
    expected = {
        0: "background", 1: "liver", 2: "liver tumor", 3: "kidney", 4: "kidney tumor", 5: "hepatic vessel",
        6: "hepatic vessel tumor", 7: "pancreas", 8: "pancreas tumor", 9: "colon tumor", 10: "lung tumor",
        11: "spleen",
    }  # fmt: skip
    assert merged_label_names() == expected  # the ids the product owner fixed in the issue


def test_task_table_invariants():
    assert [t.id for t in TASKS] == list(range(NUM_TASKS))
    assert [t.name for t in TASKS] == ["liver", "kidney", "hepatic_vessel", "pancreas", "colon", "lung", "spleen"]
    for t in TASKS:
        assert (t.organ_id is None) == (t.organ_rule is None)
        assert (t.tumor_id is None) == (t.tumor_rule is None)
    assert resolve_task("Hepatic Vessel").id == 2
    assert resolve_task("3").id == 3 and resolve_task(6).name == "spleen"
    assert [t.id for t in resolve_tasks("liver,spleen")] == [0, 6]
    assert resolve_tasks(None) == TASKS and resolve_tasks("all") == TASKS


def test_task_table_rejects_unknown_tasks():
    import pytest

    for bad in ("heart", 7, -1, 1.5, True):
        with pytest.raises(ValueError, match="unknown task"):
            resolve_task(bad)
    with pytest.raises(ValueError, match="twice"):
        resolve_tasks(["liver", 0])
