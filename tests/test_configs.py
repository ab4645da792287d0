"""Configs agree with each other where they must: one network definition, one preprocessing chain."""

from __future__ import annotations

import json

import pytest

CONFIGS = ["train.json", "inference.json"]


def load(bundle_root, name):
    return json.loads((bundle_root / "configs" / name).read_text())


def test_every_config_is_valid_json(bundle_root):
    for path in sorted((bundle_root / "configs").glob("*.json")):
        json.loads(path.read_text())


def test_train_and_inference_define_the_same_network(bundle_root):
    train, infer = (load(bundle_root, name) for name in CONFIGS)
    assert train["network_def"] == infer["network_def"]
    assert train["num_tasks"] == infer["num_tasks"] == 7


@pytest.mark.parametrize("name", CONFIGS)
def test_preprocessing_comes_from_the_shared_chain(bundle_root, name):
    config = load(bundle_root, name)
    assert config["preprocessing_steps"]["_target_"] == "scripts.transforms.ct_preprocessing"
    targets = set()

    def collect(node):
        if isinstance(node, dict):
            targets.add(str(node.get("_target_", "")).rsplit(".", 1)[-1])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(config)
    for step in ("Spacingd", "ScaleIntensityRanged", "Orientationd", "LoadImaged"):
        assert step not in targets, f"{name} defines {step} itself instead of using scripts.transforms.ct_preprocessing"


def test_inference_lets_cudnn_pick_its_fastest_kernels_after_seeding(bundle_root, monkeypatch):
    """``set_determinism`` switches cuDNN's autotuner off; inference turns it back on (``cudnn_benchmark``)."""
    import torch
    from monai.bundle import ConfigParser

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    parser = ConfigParser()
    parser.read_config(str(bundle_root / "configs" / "inference.json"))
    parser.get_parsed_content("initialize")  # evaluates the expressions in order
    assert torch.backends.cudnn.benchmark is True
    parser["cudnn_benchmark"] = False
    parser.parse(True)
    parser.get_parsed_content("initialize")
    assert torch.backends.cudnn.benchmark is False
