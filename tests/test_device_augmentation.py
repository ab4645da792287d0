"""Augmenting on the training device gives the samples of augmenting in the loader (a bundle-run epoch with it:
test_train_workflow.py)."""

from __future__ import annotations

import torch
from helpers.paths import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.data import list_data_collate
from monai.engines import PrepareBatchExtraInput
from monai.transforms import Compose
from monai.utils import set_determinism

from scripts.training import AugmentOnDevice


def _parser(**overrides):
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.json"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), "patch_size": [32, 32, 16], **overrides})
    return parser


def _samples(n: int = 4):
    torch.manual_seed(0)
    tasks = ["liver", "kidney", "pancreas", "spleen"]
    out = []
    for i in range(n):
        label = torch.zeros(1, 32, 32, 16)
        label[:, 8:20, 8:20, 4:12] = 1
        label[:, 10:14, 10:14, 6:9] = 2 if tasks[i % 4] != "spleen" else 1
        out.append({"image": torch.rand(1, 32, 32, 16) * 2 - 1, "label": label, "task": tasks[i % 4]})
    return out


def test_device_augmentation_gives_the_samples_of_loader_augmentation():
    """Same seed: augmenting each sample in the loader, then collating, equals collating, then augmenting on the
    device (here the CPU), and the trainer's prepare_batch sees the same image, 2-channel target and task ids."""
    results = []
    for on_device in (False, True):
        set_determinism(seed=3)
        parser = _parser(augment_on_device=on_device)
        augment = parser.get_parsed_content("train#augmentations") + [parser.get_parsed_content("map_task_labels")]
        prepare = PrepareBatchExtraInput(extra_keys={"task_id": "task_id"})
        chain = parser.get_parsed_content("train#preprocessing")
        assert any(type(t).__name__ == "RandZoomd" for t in chain.transforms) is not on_device  # moved off the loader
        if on_device:
            batch = AugmentOnDevice(augment, prepare)(list_data_collate(_samples()), torch.device("cpu"))
        else:
            loader_chain = Compose(augment)  # seeded by set_determinism, as AugmentOnDevice's Compose is
            batch = prepare(list_data_collate([loader_chain(s) for s in _samples()]), torch.device("cpu"))
        results.append(batch)
    (img_a, lab_a, _, kw_a), (img_b, lab_b, _, kw_b) = results
    assert img_a.shape == (4, 1, 32, 32, 16) and lab_a.shape == (4, 2, 32, 32, 16)
    assert torch.equal(img_a.as_tensor(), img_b.as_tensor()) and torch.equal(lab_a.as_tensor(), lab_b.as_tensor())
    assert torch.equal(kw_a["task_id"], kw_b["task_id"])


def test_without_the_switch_the_loader_augments_and_the_trainer_prepares_as_before():
    parser = _parser()
    chain = parser.get_parsed_content("train#preprocessing")
    assert any(type(t).__name__ == "RandZoomd" for t in chain.transforms)
    assert parser.get_parsed_content("train#device_augmentation") is None
