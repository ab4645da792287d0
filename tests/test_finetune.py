"""Fine-tuning: a new task keeps the trained tasks' outputs; the encoder-decoder transfers to a multi-class
task; both configs (merged on train.json) train one tiny epoch from a DoDNet checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from scripts.data.synth import case_rng, generate_case
from scripts.networks import DoDNet, DoDNetSegmenter
from scripts.training.finetune import (
    expand_task_checkpoint,
    load_backbone_weights,
    load_new_task_datalist,
    load_pretrained_dodnet,
    new_task_spec,
)

TINY = dict(base_channels=4, blocks=(1, 1, 1, 1, 1))


def _tiny_dodnet(num_tasks: int = 7, seed: int = 0, **kwargs) -> DoDNet:
    torch.manual_seed(seed)
    return DoDNet(num_tasks=num_tasks, **TINY, **kwargs).eval()


def test_new_task_keeps_existing_outputs_exactly() -> None:
    old = _tiny_dodnet()
    image = torch.randn(2, 1, 32, 32, 16)
    tasks = torch.arange(7).unsqueeze(0)
    with torch.no_grad():
        reference = old(image, tasks)
        # a checkpoint as saved from DDP inside {"model": ...}
        wrapped = {"model": {f"module.{k}": v for k, v in old.state_dict().items()}}
        new = DoDNet(num_tasks=8, **TINY).eval()
        new.load_state_dict(expand_task_checkpoint(wrapped))
        torch.testing.assert_close(new(image, tasks), reference, rtol=0, atol=1e-6)
        assert new.controller.fc.weight.shape[1] == old.controller.fc.weight.shape[1] + 1
        assert torch.count_nonzero(new.controller.fc.weight[:, -1]) == 0
        assert new(image, torch.tensor([7])).shape == (2, 2, 32, 32, 16)  # the new task runs
        like = DoDNet(num_tasks=8, **TINY).eval()
        like.load_state_dict(expand_task_checkpoint(old.state_dict(), init_like="spleen"))
        torch.testing.assert_close(like(image, torch.tensor([7])), reference[:, 12:14], rtol=0, atol=1e-6)


def test_expand_task_only_controller_and_refusals(tmp_path: Path) -> None:
    old = _tiny_dodnet(conditioning="task")
    state = expand_task_checkpoint(old.state_dict(), num_new_tasks=2)
    new = DoDNet(num_tasks=9, conditioning="task", **TINY).eval()
    new.load_state_dict(state)
    image = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(new(image, torch.tensor([3])), old(image, torch.tensor([3])), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no task input"):
        expand_task_checkpoint(_tiny_dodnet(conditioning="image").state_dict())
    with pytest.raises(ValueError, match="positive integer"):
        expand_task_checkpoint(old.state_dict(), num_new_tasks=0)
    with pytest.raises(FileNotFoundError, match="model weights not found: .*missing.pt"):
        expand_task_checkpoint(tmp_path / "missing.pt")
    path = tmp_path / "seven.pt"
    torch.save(_tiny_dodnet(num_tasks=8).state_dict(), path)
    with pytest.raises(ValueError, match="checkpoint has 8 tasks, the network only 7"):
        load_pretrained_dodnet(DoDNet(num_tasks=7, **TINY), path)


def test_multiclass_segmenter_loads_the_encoder_decoder(tmp_path: Path) -> None:
    dodnet = _tiny_dodnet(seed=3)
    path = tmp_path / "model.pt"
    torch.save(dodnet.state_dict(), path)
    seg = load_backbone_weights(DoDNetSegmenter(out_channels=14, **TINY), path)
    for key, value in dodnet.backbone.state_dict().items():
        if not key.startswith("precls_conv.2."):
            assert torch.equal(seg.backbone.state_dict()[key], value), key
    assert seg(torch.randn(1, 1, 32, 32, 16)).shape == (1, 14, 32, 32, 16)
    with pytest.raises(ValueError, match="do not fit the network"):
        load_backbone_weights(DoDNetSegmenter(out_channels=14, base_channels=8, blocks=(1, 1, 1, 1, 1)), path)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _run_train(config_files, overrides, bundle_root: Path) -> None:
    from monai.bundle import ConfigWorkflow

    configs = bundle_root / "configs"
    workflow = ConfigWorkflow(
        config_file=[str(configs / f) for f in config_files],
        meta_file=str(configs / "metadata.json"),
        logging_file=str(configs / "logging.conf"),
        workflow_type="train",
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


def _common(tmp_path: Path, bundle_root: Path, datalist: Path, ckpt: Path) -> dict:
    return {
        "bundle_root": str(bundle_root),
        "datalist": str(datalist),
        "dataset_dir": "",
        "pretrained_ckpt": str(ckpt),
        "ckpt_dir": str(tmp_path / "ckpt"),
        "output_dir": str(tmp_path / "out"),
        "device": "$torch.device('cpu')",
        "epochs": 1,
        "val_interval": 1,
        "patch_size": [32, 32, 16],
        "batch_size": 1,
        "num_workers": 0,
        "cache_rate": 0.0,
        "amp": False,
        "resume": False,
        "train#augmentations": [],
        "network_def#base_channels": 4,
        "network_def#blocks": [1, 1, 1, 1, 1],
    }


@pytest.mark.slow
def test_finetune_new_task_config_trains(tmp_path: Path, bundle_root: Path) -> None:
    pretrained = _tiny_dodnet()
    ckpt = tmp_path / "pretrained.pt"
    torch.save(pretrained.state_dict(), ckpt)
    items = []
    for i, task in enumerate(("liver", "liver", "spleen")):  # liver-convention labels serve as the new task's
        case = generate_case(task, case_rng(5, 0, "training", i))
        name = "new_task" if task == "liver" else "spleen"
        items.append(
            {
                "image": _write(tmp_path / f"data/img{i}.nii.gz", case.image, case.affine),
                "label": _write(tmp_path / f"data/lab{i}.nii.gz", case.label, case.affine),
                "task": name,
            }
        )
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items, "validation": items[:1]}))
    assert [it["task"] for it in load_new_task_datalist(datalist, new_task_spec("new_task"))] == [
        "new_task",
        "new_task",
        "spleen",
    ]
    _run_train(["train.json", "finetune_new_task.json"], _common(tmp_path, bundle_root, datalist, ckpt), bundle_root)
    saved = list((tmp_path / "ckpt").glob("*.pt"))
    assert saved, "no checkpoint written"
    state = torch.load(str(max(saved, key=lambda p: p.stat().st_mtime)), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["controller.fc.weight"].shape[1] == pretrained.controller.fc.weight.shape[1] + 1


def test_new_task_datalist_lists_every_problem(tmp_path: Path) -> None:
    datalist = tmp_path / "d.json"
    datalist.write_text(
        json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz", "task": "brain"}, {"task": "new"}]})
    )
    with pytest.raises(ValueError) as err:
        load_new_task_datalist(datalist, new_task_spec("new"))
    message = str(err.value)
    assert "[training][0]: bad or missing task" in message and "brain" in message
    assert "[training][1]: image file" in message and "[training][1]: label file" in message
    with pytest.raises(ValueError, match="already a MOTS task"):
        new_task_spec("liver")


@pytest.mark.slow
def test_finetune_multiclass_config_trains(tmp_path: Path, bundle_root: Path) -> None:
    ckpt = tmp_path / "pretrained.pt"
    torch.save(_tiny_dodnet(seed=1).state_dict(), ckpt)
    items = []
    for i in range(2):  # BCV-like labels: the phantom's 12 structures as classes 1..12 (of 0..13)
        case = generate_case("liver", case_rng(7, 0, "training", i))
        items.append(
            {
                "image": _write(tmp_path / f"bcv/img{i}.nii.gz", case.image, case.affine),
                "label": _write(tmp_path / f"bcv/lab{i}.nii.gz", case.structures, case.affine),
            }
        )
    datalist = tmp_path / "bcv.json"
    datalist.write_text(json.dumps({"training": items, "validation": items[:1]}))
    overrides = _common(tmp_path, bundle_root, datalist, ckpt)
    overrides.pop("network_def#base_channels")
    overrides.pop("network_def#blocks")
    overrides.update({"network_def#base_channels": 4, "network_def#blocks": [1, 1, 1, 1, 1]})
    _run_train(["train.json", "finetune_multiclass.json"], overrides, bundle_root)
    saved = list((tmp_path / "ckpt").glob("*.pt"))
    assert saved, "no checkpoint written"
    state = torch.load(str(max(saved, key=lambda p: p.stat().st_mtime)), map_location="cpu", weights_only=True)
    state = state.get("model", state)
    assert state["backbone.precls_conv.2.weight"].shape[0] == 14
    assert not any(k.startswith("controller.") for k in state)
