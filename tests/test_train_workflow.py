"""configs/train.json and configs/multi_gpu_train.json on tiny synthetic NIfTI data (CPU).

Subprocess runs use ``python -m monai.bundle run`` exactly as users do, with a 4-wide DoDNet and
[32, 32, 16] patches; each takes seconds on a 2-core CPU.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from helpers.paths import BUNDLE_ROOT, REPO_ROOT
from helpers.tiny_mots import write_tiny_mots
from ignite.engine import Events
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.transforms import Compose

from scripts.data.datalist import DatalistError
from scripts.data.label_mapping import UNLABELED
from scripts.networks import DoDNet

TRAIN = BUNDLE_ROOT / "configs" / "train.json"
MULTI_GPU = BUNDLE_ROOT / "configs" / "multi_gpu_train.json"
RUN_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_mots")
    write_tiny_mots(root, shape=(40, 40, 20))
    return root


def _overrides(tmp: Path, data: Path, **extra: Any) -> Dict[str, Any]:
    values: Dict[str, Any] = {
        "bundle_root": str(BUNDLE_ROOT),
        "dataset_dir": str(data),
        "ckpt_dir": str(tmp / "models"),
        "output_dir": str(tmp / "eval"),
        "epochs": 1,
        "val_interval": 1,
        "patch_size": [32, 32, 16],
        "batch_size": 4,
        "num_workers": 0,
        "network_def#base_channels": 4,
    }
    values.update(extra)
    return values


def _cli(overrides: Dict[str, Any]) -> List[str]:
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return args


def _env() -> Dict[str, str]:
    # torch.compile tests earlier in this process leave Inductor variables in os.environ, one of them a pointer
    # into this process (_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR); a child inheriting it aborted at exit (SIGABRT)
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k}
    env["OMP_NUM_THREADS"] = "1"  # two test processes share two cores
    return env


def _torchrun_two_ranks(overrides: Dict[str, Any]) -> subprocess.CompletedProcess:
    """train.json + multi_gpu_train.json in 2 gloo processes through torchrun."""
    config = json.dumps([str(TRAIN), str(MULTI_GPU)])
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
        "-m", "monai.bundle", "run", "--config_file", config, "--dist_backend", "gloo",
    ] + _cli(overrides)  # fmt: skip
    return subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _bundle_run(overrides: Dict[str, Any], config: str = str(TRAIN)) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config] + _cli(overrides)
    return subprocess.run(
        cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )


def _load(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _epoch(checkpoint: Dict[str, Any]) -> int:
    """The trainer epoch stored in a checkpoint (ignite saves iterations and the epoch length)."""
    return checkpoint["trainer"]["iteration"] // checkpoint["trainer"]["epoch_length"]


def _poly_lr(epoch: int, epochs: int, base: float = 0.01) -> float:
    return base * (1 - epoch / epochs) ** 0.9


@pytest.mark.parametrize("configs", [[TRAIN], [TRAIN, MULTI_GPU]], ids=["train", "multi_gpu_train"])
def test_check_properties(tmp_path, tiny_data, configs, monkeypatch):
    if MULTI_GPU in configs:  # a one-process gloo group, as torchrun would set up
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("MASTER_PORT", str(29500 + os.getpid() % 1000))
    workflow = ConfigWorkflow(
        config_file=[str(c) for c in configs],
        workflow_type="train",
        logging_file=False,
        **_overrides(tmp_path, tiny_data, dist_backend="gloo"),
    )
    workflow.initialize()
    try:
        assert workflow.check_properties() == []
    finally:
        workflow.finalize()


def test_training_pipeline_keeps_the_unlabeled_marker(tmp_path, tiny_data):
    """Pad (patch larger than the volume), crop, zoom and flips act on the source label; -1 survives intact."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(_overrides(tmp_path, tiny_data, patch_size=[48, 48, 32]))
    parser.update({"train#augmentations#0#prob": 1.0})  # always zoom (0.7-1.4, zero padding when zooming out)
    items = {item["task"]: item for item in parser.get_parsed_content("train#datalist")}
    transform = parser.get_parsed_content("train#preprocessing")
    for task, unlabeled_channel in (("colon", 0), ("lung", 0), ("spleen", 1), ("liver", None)):
        for _ in range(3):
            out = transform(items[task])[0]  # RandCropByPosNegLabeld returns a list of crops
            image, target = out["image"], out["label"]
            assert image.shape == (1, 48, 48, 32) and target.shape == (2, 48, 48, 32)
            assert out["task_id"] == {"colon": 4, "lung": 5, "spleen": 6, "liver": 0}[task]
            for channel in (0, 1):
                values = set(torch.unique(target[channel]).tolist())
                if channel == unlabeled_channel:
                    assert values == {UNLABELED}, f"{task}: channel {channel} must stay all -1"
                else:
                    assert values <= {0.0, 1.0}, f"{task}: channel {channel} has {values}"


@pytest.mark.parametrize("configs", [[TRAIN], [TRAIN, TRAIN.parent / "demo.json"]], ids=["train", "demo"])
def test_crop_ratio_ids_steer_both_crops(configs):
    """``foreground_crops`` : ``random_crops`` is the share of patches centred on the task's label, in the
    in-memory crop and in the preprocessed one. train.json's 4 : 1 keeps a corner lesion in most patches;
    demo.json's 0 : 1 places patches without regard to the label (its task heads must also see the other organs)."""
    parser = ConfigParser()
    parser.read_config([str(c) for c in configs])
    parser.update({"bundle_root": str(BUNDLE_ROOT), "patch_size": [16, 16, 16]})
    pos, neg = parser.get_parsed_content("foreground_crops"), parser.get_parsed_content("random_crops")
    assert parser.get_parsed_content("train#load_patch").pos_ratio == pytest.approx(pos / (pos + neg))
    crop = Compose(parser.get_parsed_content("train#crop_transforms")).set_random_state(seed=0)
    label = torch.zeros(1, 48, 48, 32)
    label[:, 1:4, 1:4, 1:4] = 1  # a lesion in one corner
    item = {"image": torch.rand(1, 48, 48, 32), "label": label}
    hits = sum(int(crop(dict(item))[0]["label"].sum() > 0) for _ in range(100)) / 100
    assert hits >= 0.65 if pos / (pos + neg) == 0.8 else hits <= 0.2, (pos, neg, hits)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"val_interval": 0}, "val_interval must be a whole number of epochs >= 1, got 0"),
        ({"foreground_crops": -1}, "foreground_crops and random_crops) must be non-negative"),
        ({"foreground_crops": 0, "random_crops": 0}, "not both zero, got 0 and 0"),
    ],
)
def test_bad_validation_interval_or_crop_ratio_is_a_one_line_user_error(overrides, message):
    from scripts.cli_errors import USAGE_EXIT, one_line, user_error_exit

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    target = "train#handlers" if "val_interval" in overrides else "train#load_patch"
    with pytest.raises(RuntimeError) as info:  # MONAI's config parser wraps the constructor's error
        parser.get_parsed_content(target)
    error, code = user_error_exit(info.value)
    assert code == USAGE_EXIT and message in one_line(error)


@pytest.mark.parametrize("channels_last", [True, False])
def test_channels_last_switch_sets_the_training_memory_format(tmp_path, tiny_data, channels_last):
    """``channels_last`` (default true: oneDNN's fast 3-D kernels, ~25% per CPU step) stores every 5-D weight
    channels-last; false keeps them contiguous. Either way the network computes the same function."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(_overrides(tmp_path, tiny_data, channels_last=channels_last))
    network = parser.get_parsed_content("network")
    weights = [p for p in network.parameters() if p.dim() == 5]
    assert weights
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    assert all(w.is_contiguous(memory_format=fmt) for w in weights)
    if channels_last:
        assert not any(w.is_contiguous() for w in weights if w.shape[1] > 1 and w.shape[2:].numel() > 1)
    reference = copy.deepcopy(network).to(memory_format=torch.contiguous_format).eval()
    x = torch.randn(1, 1, 32, 32, 16)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(x), reference(x), rtol=1e-4, atol=1e-4)


def test_bad_datalist_fails_before_training(tmp_path, tiny_data):
    datalist = json.loads((tiny_data / "datalist.json").read_text())
    datalist["training"][1]["task"] = "brain"
    datalist["training"][2]["image"] = "imagesTr/missing.nii.gz"
    (tmp_path / "bad.json").write_text(json.dumps(datalist))
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(_overrides(tmp_path, tiny_data, datalist=str(tmp_path / "bad.json")))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#trainer")
    error = info.value
    while error is not None and not isinstance(error, DatalistError):
        error = error.__cause__
    assert isinstance(error, DatalistError), f"expected a DatalistError, got {info.value!r}"
    assert "2 of 7 items are unusable" in str(error)
    assert "unknown task 'brain'" in str(error) and "missing.nii.gz" in str(error)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_one_tiny_epoch_through_bundle_run(tmp_path, tiny_data):
    result = _bundle_run(_overrides(tmp_path, tiny_data))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    last = _load(tmp_path / "models" / "checkpoint_epoch=1.pt")
    assert set(last) == {"model", "optimizer", "lr_scheduler", "trainer", "best_model_saver", "evaluator_best"}
    assert len(next(iter(last["best_model_saver"].values()))) == 1  # the best model's (score, name) record
    assert _epoch(last) == 1 and last["lr_scheduler"]["last_epoch"] == 1
    group = last["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.99 and group["nesterov"] is True and group["weight_decay"] == 0.0
    assert group["lr"] == pytest.approx(_poly_lr(1, 1))
    best = _load(tmp_path / "models" / "model.pt")
    network = DoDNet(base_channels=4)
    network.load_state_dict(best)  # a plain state_dict of the bare DoDNet (Model Zoo convention), strict
    for name in ("val_mean_dice", "val_dice_liver", "val_dice_liver_tumor", "val_dice_colon_tumor"):
        assert f"{name}: " in log, f"{name} not logged"
    assert "val_dice_spleen" not in log  # no spleen case in the validation split: not reported
    assert list((tmp_path / "eval").glob("events.out.tfevents.*")), "no TensorBoard event file"


@pytest.mark.slow
def test_one_tiny_epoch_with_deep_supervision(tmp_path, tiny_data):
    """deep_supervision 2: the trainer's loss weighs the 1/2 and 1/4 outputs too; the saved model, with its
    deep-supervision modules, loads into the inference network (which has none)."""
    from monai.losses import DeepSupervisionLoss

    from scripts.networks.weights import load_network_weights

    overrides = _overrides(tmp_path, tiny_data, deep_supervision=2)
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(overrides)
    assert isinstance(parser.get_parsed_content("train#trainer#loss_function"), DeepSupervisionLoss)
    result = _bundle_run(overrides)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    best = _load(tmp_path / "models" / "model.pt")
    assert any(key.startswith("backbone.ds_precls.1.") for key in best)
    load_network_weights(DoDNet(base_channels=4), tmp_path / "models" / "model.pt")


@pytest.mark.slow
def test_one_epoch_with_augmentation_on_the_device(tmp_path, tiny_data):
    """augment_on_device (the CPU as the device here): the loader only cuts patches; training and validation run."""
    result = _bundle_run(_overrides(tmp_path, tiny_data, augment_on_device=True))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (tmp_path / "models" / "model.pt").is_file() and "val_mean_dice: " in log


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, tiny_data):
    """Kill a 2-epoch run during epoch 2; the next start restores epoch, LR schedule, optimizer and weights."""
    overrides = _overrides(tmp_path, tiny_data, epochs=2, val_interval=100, batch_size=2)  # 4 iterations/epoch
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(TRAIN)] + _cli(overrides)
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, log, killed = time.monotonic() + RUN_TIMEOUT_S, [], False
    try:
        for line in proc.stdout:
            log.append(line)
            if "Epoch: 2/2, Iter: 1/4" in line:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            if time.monotonic() > deadline:
                break
    finally:
        if not killed:
            proc.kill()
        proc.wait(timeout=30)
    assert killed, "".join(log)[-4000:]
    ckpt_dir = tmp_path / "models"
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=1.pt"]
    saved = _load(ckpt_dir / "checkpoint_epoch=1.pt")

    # the restored state, seen from a handler that runs right after the resume loader
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    for handler in workflow.parser.get_parsed_content("train#checkpoint_handlers"):
        handler.attach(trainer)
    optimizer = workflow.parser.get_parsed_content("optimizer")
    scheduler = workflow.parser.get_parsed_content("lr_scheduler")
    network = workflow.parser.get_parsed_content("network")
    seen: Dict[str, Any] = {}

    @trainer.on(Events.STARTED)
    def probe(engine):
        seen["epoch"] = engine.state.epoch
        seen["optimizer"] = optimizer.state_dict()
        seen["scheduler"] = scheduler.state_dict()
        seen["model"] = {k: v.clone() for k, v in network.state_dict().items()}
        engine.terminate()

    trainer.run()
    assert seen["epoch"] == 1
    assert seen["scheduler"]["last_epoch"] == 1
    assert seen["optimizer"]["param_groups"][0]["lr"] == pytest.approx(_poly_lr(1, 2))
    assert seen["optimizer"]["param_groups"][0]["lr"] == saved["optimizer"]["param_groups"][0]["lr"]
    momentum = {k: v["momentum_buffer"] for k, v in seen["optimizer"]["state"].items()}
    assert momentum and all(
        torch.equal(v, saved["optimizer"]["state"][k]["momentum_buffer"]) for k, v in momentum.items()
    )
    assert all(torch.equal(v, saved["model"][k]) for k, v in seen["model"].items())

    # the same command again finishes the interrupted epoch 2 only
    result = _bundle_run(overrides)
    log2 = result.stdout + result.stderr
    assert result.returncode == 0, log2[-4000:]
    assert f"Restored all variables from {ckpt_dir / 'checkpoint_epoch=1.pt'}" in log2
    assert "Epoch: 2/2, Iter: 4/4" in log2 and "Epoch: 1/2" not in log2
    assert sorted(p.name for p in ckpt_dir.glob("checkpoint_epoch=*.pt")) == ["checkpoint_epoch=2.pt"]  # one kept
    final = _load(ckpt_dir / "checkpoint_epoch=2.pt")
    assert _epoch(final) == 2 and final["lr_scheduler"]["last_epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("epochs, val_interval, validated", [(3, 2, [2, 3]), (4, 2, [2, 4]), (2, 5, [2])])
def test_the_last_epoch_is_always_validated(tmp_path, tiny_data, epochs, val_interval, validated):
    """Validation runs every ``val_interval`` epochs and after the last one, so the best model (models/model.pt)
    can be the final weights even when ``val_interval`` does not divide ``epochs``, and a run shorter than
    ``val_interval`` still has one; nothing is validated twice."""
    overrides = _overrides(tmp_path, tiny_data, epochs=epochs, val_interval=val_interval, resume=False)
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    runs: List[int] = []
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    evaluator.add_event_handler(Events.COMPLETED, lambda engine: runs.append(engine.state.epoch))
    workflow.run()
    workflow.finalize()
    assert runs == validated
    assert (tmp_path / "models" / "model.pt").is_file()


@pytest.mark.slow
def test_resumed_run_keeps_the_best_metric_of_the_first(tmp_path, tiny_data, caplog):
    """Run 1 (one epoch) sets the best validation Dice; run 2 resumes it for epoch 2 with every prediction empty
    (threshold above any probability: Dice 0, no better than run 1's): no "new best" is logged, the evaluator's
    best metric and epoch are run 1's, and models/model.pt keeps run 1's weights."""
    first = _bundle_run(_overrides(tmp_path, tiny_data))
    log1 = first.stdout + first.stderr
    assert first.returncode == 0, log1[-4000:]
    saved = _load(tmp_path / "models" / "checkpoint_epoch=1.pt")["evaluator_best"]
    assert saved["best_metric_epoch"] == 1 and f"Got new best metric of val_mean_dice: {saved['best_metric']}" in log1
    best_model = _load(tmp_path / "models" / "model.pt")

    empty = {"validate#postprocessing_steps#1#threshold": 1.1}
    overrides = _overrides(tmp_path, tiny_data, epochs=2, **empty)
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    with caplog.at_level(logging.INFO):
        workflow.run()
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.epoch == 2 and evaluator.state.metrics["val_mean_dice"] == 0.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (saved["best_metric"], 1)
    assert "Got new best metric" not in caplog.text and "restored best metric" in caplog.text
    final = _load(tmp_path / "models" / "checkpoint_epoch=2.pt")
    assert _epoch(final) == 2 and final["evaluator_best"] == saved
    assert all(torch.equal(v, best_model[k]) for k, v in _load(tmp_path / "models" / "model.pt").items())


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_data):
    overrides = _overrides(tmp_path, tiny_data, batch_size=2)
    result = _torchrun_two_ranks(overrides)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
    last = _load(tmp_path / "models" / "checkpoint_epoch=1.pt")
    assert _epoch(last) == 1
    assert not any(k.startswith("module.") for k in last["model"]), "DDP wrapper leaked into the checkpoint"
    # 7 training items over 2 ranks (4 each, padded), batch 2 -> 2 iterations per rank
    assert "Epoch: 1/1, Iter: 2/2" in log and log.count("Saved checkpoint at epoch: 1") == 1


@pytest.fixture(scope="module")
def tiny_preprocessed(tiny_data, tmp_path_factory) -> Path:
    from scripts.data.preprocess import preprocess_datalist

    out = tmp_path_factory.mktemp("tiny_preprocessed")
    _, failures = preprocess_datalist(tiny_data / "datalist.json", out, workers=0, progress=False)
    assert failures == []
    return out


def test_preprocessed_dir_reads_patches_of_memory_mapped_cases(tmp_path, tiny_data, tiny_preprocessed):
    """With preprocessed_dir the datasets hold paths only; training items become patches (pad where the case is
    smaller), validation items whole cases; the unlabeled marker survives as in the default pipeline."""
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(_overrides(tmp_path, tiny_data, preprocessed_dir=str(tiny_preprocessed), patch_size=[48, 48, 16]))
    assert parser.get_parsed_content("train#datalist") is None  # the source datalist is not even read
    dataset = parser.get_parsed_content("train#dataset")
    assert len(dataset) == 7 and all(isinstance(dataset.data[i]["image"], str) for i in range(7))
    for index in range(len(dataset)):
        out = dataset[index]
        task = dataset.data[index]["task"]
        assert out["image"].shape == (1, 48, 48, 16) and out["label"].shape == (2, 48, 48, 16)
        unlabeled = {"colon": 0, "lung": 0, "spleen": 1}.get(task)
        for channel in (0, 1):
            values = set(torch.unique(out["label"][channel]).tolist())
            assert values == {UNLABELED} if channel == unlabeled else values <= {0.0, 1.0}
    val = parser.get_parsed_content("validate#dataset")
    case = val[0]
    assert case["image"].shape == (1, 40, 40, 20) and case["label"].shape == (2, 40, 40, 20)
    assert case["task_id"] == 0


def test_val_cases_per_task_and_sampler_options(tmp_path, tiny_data):
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(
        _overrides(tmp_path, tiny_data, val_cases_per_task=1, sampling="task_balanced", iterations_per_epoch=3)
    )
    assert [i["task"] for i in parser.get_parsed_content("validate#dataset").data] == ["liver", "colon"]
    sampler = parser.get_parsed_content("train#sampler")
    assert sampler.sampling == "task_balanced" and len(sampler) == 3 * 4
    assert len(parser.get_parsed_content("train#dataloader")) == 3
    assert parser.get_parsed_content("validate#inferer").precision == "auto"


def test_broken_preprocessed_case_fails_before_training(tmp_path, tiny_data, tiny_preprocessed):
    import shutil

    copy_dir = tmp_path / "pre"
    shutil.copytree(tiny_preprocessed, copy_dir)
    label = copy_dir / "cases" / "training_003_pancreas" / "label.npy"
    label.write_bytes(label.read_bytes()[:-64])
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(_overrides(tmp_path, tiny_data, preprocessed_dir=str(copy_dir)))
    with pytest.raises(Exception) as info:
        parser.get_parsed_content("train#trainer")
    error = info.value
    while error is not None and not isinstance(error, DatalistError):
        error = error.__cause__
    assert isinstance(error, DatalistError), f"expected a DatalistError, got {info.value!r}"
    assert f"label {label} is missing, truncated" in str(error)
    assert not (tmp_path / "models").exists()


@pytest.mark.slow
def test_one_tiny_epoch_from_preprocessed_dir(tmp_path, tiny_data, tiny_preprocessed):
    overrides = _overrides(
        tmp_path,
        tiny_data,
        preprocessed_dir=str(tiny_preprocessed),
        dataset_dir="",
        batch_size=2,
        iterations_per_epoch=3,
        sampling="task_balanced",
        val_cases_per_task=1,
    )
    result = _bundle_run(overrides)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "Epoch: 1/1, Iter: 3/3" in log
    assert "val_dice_liver: " in log and "val_dice_colon_tumor: " in log
    assert _epoch(_load(tmp_path / "models" / "checkpoint_epoch=1.pt")) == 1


@pytest.mark.slow
def test_ddp_two_cpu_processes_from_preprocessed_dir(tmp_path, tiny_data, tiny_preprocessed):
    overrides = _overrides(tmp_path, tiny_data, preprocessed_dir=str(tiny_preprocessed), dataset_dir="", batch_size=2)
    result = _torchrun_two_ranks(overrides)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    # 7 training items over 2 ranks (4 each, wrapped), batch 2 -> 2 iterations per rank
    assert "Epoch: 1/1, Iter: 2/2" in log and log.count("Saved checkpoint at epoch: 1") == 1
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["checkpoint_epoch=1.pt", "model.pt"]
