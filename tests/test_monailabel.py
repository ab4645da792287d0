"""The bundle in a real MONAI Label 0.8.5 server: inference over HTTP, the task option, and training.

The ``monailabel``-marked test builds its own virtual environment under ``.cache/monailabel-venv``
(reused when complete; about 4 minutes the first time): MONAI Label needs a torch build whose
torchvision imports, which the project's CPU torch lacks. It copies the ``monaibundle`` sample app,
puts a copy of this bundle in its ``model/`` folder (tiny width, a hand-made checkpoint, a coarse
3 mm grid so a CPU answers in seconds; the configs' structure is unchanged), starts
``monailabel start_server`` on 127.0.0.1 and talks to it over HTTP. Every wait is bounded and the
server is stopped by its process id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.paths import REPO_ROOT

from scripts.data.label_mapping import MapTaskLabelsd
from scripts.networks import DoDNet
from scripts.tasks import TASKS

VENV = REPO_ROOT / ".cache" / "monailabel-venv"
REQUIREMENTS: List[List[str]] = [
    ["torch==2.14.1", "torchvision==0.29.1"],
    ["monailabel==0.8.5"],
    ["pydicom<3", "dicomweb-client<0.60", "pynetdicom<2.1"],  # pydicom-seg does not import on pydicom 3
]
STAMP = VENV / ".dodnet-complete"
MODEL = "dodnet_bundle"
TINY_WIDTH = 8
INSTALL_TIMEOUT = 1800
SERVER_START_TIMEOUT = 240
REQUEST_TIMEOUT = 600


# ---- default task for image/label pairs (MONAI Label's training data): a plain unit test ----------------


def test_map_task_labels_uses_default_task_for_items_without_task():
    label = torch.tensor([0, 1, 2, 1]).reshape(1, 4, 1, 1)
    out = MapTaskLabelsd(default_task="liver")({"image": torch.zeros(1, 4, 1, 1), "label": label})
    assert out["task_id"] == 0
    assert out["label"][:, :, 0, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 0]]
    named = MapTaskLabelsd(default_task="liver")({"label": label, "task": "kidney"})
    assert named["task_id"] == 1  # an item's own task wins over the default
    with pytest.raises(ValueError, match="no 'task' key .* no default_task"):
        MapTaskLabelsd()({"label": label})
    with pytest.raises(ValueError, match="(?i)unknown task|not a task|heart"):
        MapTaskLabelsd(default_task="heart")


def test_stash_keeps_monailabel_image_path_away_from_spacingd(tmp_path):
    """MONAI >= 1.5 Spacingd calls .update() on every ``image_*`` item of a NIfTI image; MONAI Label adds
    the string ``image_path``. The stash pair makes the chain work and hands the path back unchanged."""
    from monai.transforms import Compose, LoadImaged, Spacingd

    from scripts.data.monailabel_compat import RestoreStashedItemsd, StashStringItemsd

    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.diag([2.0, 2.0, 4.0, 1.0])), str(path))
    load = LoadImaged("image", ensure_channel_first=True, image_only=False)
    spacing = Spacingd("image", pixdim=(4.0, 4.0, 4.0))
    data = {"image": str(path), "image_path": str(path)}
    with pytest.raises(RuntimeError, match="Spacingd") as err:
        Compose([load, spacing])(dict(data))
    assert isinstance(err.value.__cause__, AttributeError) and "update" in str(err.value.__cause__)
    out = Compose([load, StashStringItemsd("image"), spacing, RestoreStashedItemsd()])(dict(data))
    assert out["image_path"] == str(path) and tuple(out["image"].shape) == (1, 4, 4, 4)
    assert "_stashed_string_items" not in out
    plain = Compose([load, StashStringItemsd("image"), spacing, RestoreStashedItemsd()])({"image": str(path)})
    assert set(plain) == {"image", "image_meta_dict"}  # a no-op outside MONAI Label


# ---- environment ----------------------------------------------------------------------------------------


def _ensure_venv() -> Path:
    """Create (or reuse) the MONAI Label virtual environment; returns its python."""
    python = VENV / "bin" / "python"
    want = json.dumps(REQUIREMENTS)
    if STAMP.is_file() and python.is_file() and STAMP.read_text() == want:
        return python
    VENV.parent.mkdir(parents=True, exist_ok=True)
    steps = [[sys.executable, "-m", "venv", str(VENV)]] if not python.is_file() else []
    steps += [[str(python), "-m", "pip", "install", "--quiet", *reqs] for reqs in REQUIREMENTS]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
        if proc.returncode != 0:
            pytest.fail(
                f"setting up the MONAI Label venv failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
            )
    STAMP.write_text(want)
    return python


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, data: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None, timeout: float = 30):
    req = urllib.request.Request(url, data=data, headers=headers or {}, method="POST" if data is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return resp.read(), dict(resp.headers)


# ---- the app: sample app + this bundle (tiny) + studies -------------------------------------------------


def _edit_json(path: Path, edits: Dict[str, Any]) -> None:
    """Set ``a#b#c``-style keys in a JSON config file."""
    config = json.loads(path.read_text())
    for key, value in edits.items():
        node = config
        *parents, last = key.split("#")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value
    path.write_text(json.dumps(config, indent=4))


def _tiny_checkpoint(path: Path) -> None:
    """Weights whose every task's dynamic head outputs organ logit +6 and tumor logit -6 everywhere.

    The controller's kernel is zero and its bias sets only the last layer's biases, so each requested
    task segments "its organ everywhere, no tumor": a request's label values reveal which tasks ran.
    """
    torch.manual_seed(0)
    net = DoDNet(base_channels=TINY_WIDTH)
    state = net.state_dict()
    state["controller.fc.weight"].zero_()
    bias = torch.zeros_like(state["controller.fc.bias"])
    bias[-2:] = torch.tensor([6.0, -6.0])  # (organ, tumor) biases of the last head layer
    state["controller.fc.bias"] = bias
    torch.save(state, path)


def _make_app(tmp: Path, real_ct: Path, bundle_root: Path) -> Dict[str, Path]:
    app = tmp / "app"
    shutil.copytree(
        VENV / "monailabel" / "sample-apps" / "monaibundle", app, ignore=shutil.ignore_patterns("__pycache__")
    )
    bundle = app / "model" / MODEL
    shutil.copytree(
        bundle_root, bundle, ignore=shutil.ignore_patterns("__pycache__", ".cache", "models", "eval", "runs", "*.pyc")
    )
    (bundle / "models").mkdir()
    _tiny_checkpoint(bundle / "models" / "model.pt")
    coarse = {
        "network_def#base_channels": TINY_WIDTH,
        "patch_size": [128, 128, 32],
        "pixdim": [3.0, 3.0, 3.0],
    }
    _edit_json(bundle / "configs" / "inference.json", coarse)
    _edit_json(
        bundle / "configs" / "train.json",
        {**coarse, "patch_size": [64, 64, 32], "num_workers": 0, "cache_rate": 0.0, "val_interval": 1},
    )
    studies = tmp / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    seg = nib.load(str(real_ct / "example_seg.nii.gz"))
    liver = (np.asarray(seg.dataobj) == 5).astype(np.uint8)  # TotalSegmentator liver id 5 -> LiTS organ value 1
    for name in ("example_ct_sm", "example_ct_sm_b"):
        shutil.copy(real_ct / "example_ct_sm.nii.gz", studies / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(liver, seg.affine), str(studies / "labels" / "final" / f"{name}.nii.gz"))
    return {"app": app, "bundle": bundle, "studies": studies}


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_ct, bundle_root) -> Iterator[Dict[str, Any]]:
    python = _ensure_venv()
    tmp = tmp_path_factory.mktemp("monailabel")
    paths = _make_app(tmp, real_ct, bundle_root)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    log_path = tmp / "server.log"
    cmd = [
        str(python.parent / "monailabel"),
        "start_server",
        "--app", str(paths["app"]),
        "--studies", str(paths["studies"]),
        "--conf", "models", MODEL,
        "--conf", "sam2", "false",
        "--conf", "zoo_source", "github",
        "--conf", "skip_trainers", "false",
        "--host", "127.0.0.1",
        "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def log_tail() -> str:
        return log_path.read_text(errors="replace")[-6000:]

    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        info = None
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"MONAI Label server exited with {proc.returncode}:\n{log_tail()}")
            try:
                info = json.loads(_request(f"{base}/info/", timeout=10)[0])
                break
            except (urllib.error.URLError, ConnectionError, socket.timeout):
                time.sleep(1.0)
        if info is None:
            pytest.fail(f"MONAI Label server did not answer /info/ within {SERVER_START_TIMEOUT} s:\n{log_tail()}")
        yield {"base": base, "info": info, "log": log_tail, **paths}
    finally:
        if proc.poll() is None:
            proc.terminate()  # stop the server by its process id
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        try:  # workers the server started share its session (process group id = its pid)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _infer(server: Dict[str, Any], image: str, params: Dict[str, Any]) -> nib.Nifti1Image:
    query = urllib.parse.urlencode({"image": image, "output": "image"})
    body = urllib.parse.urlencode({"params": json.dumps(params)}).encode()
    try:
        data, _ = _request(
            f"{server['base']}/infer/{MODEL}?{query}",
            data=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
            timeout=REQUEST_TIMEOUT,
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/infer/{MODEL} failed: {e.code} {e.read()[:2000]!r}\n{server['log']()}")
    path = Path(server["app"]).parent / f"pred_{len(list(Path(server['app']).parent.glob('pred_*')))}.nii.gz"
    path.write_bytes(data)
    return nib.load(str(path))


@pytest.mark.monailabel
@pytest.mark.slow
def test_monailabel_server_infer_options_and_train(server, real_ct):
    # /info/: the model, its label names (metadata channel_def) and the task option (default all tasks)
    meta = json.loads((Path(server["bundle"]) / "configs" / "metadata.json").read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    model_info = server["info"]["models"][MODEL]
    assert model_info["labels"] == {v.lower(): int(k) for k, v in channel_def.items() if v.lower() != "background"}
    assert model_info["config"]["tasks"] == "all"
    assert MODEL in server["info"].get("trainers", {}), "the training path is not registered"
    assert server["info"]["trainers"][MODEL]["config"]["default_task"] == "liver"

    src = nib.load(str(real_ct / "example_ct_sm.nii.gz"))
    ids = {t.name: t for t in TASKS}

    # default request: all tasks; the label map has the input's geometry and only channel_def ids
    pred = _infer(server, "example_ct_sm", {})
    values = set(np.unique(np.asarray(pred.dataobj)).tolist())
    assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-3)
    assert values <= {int(k) for k in channel_def} and values != {0}

    # the task choice is a user option: only the requested tasks' structures appear
    for task in ("liver", "kidney"):
        pred = _infer(server, "example_ct_sm", {"tasks": task})
        assert pred.shape == src.shape and np.allclose(pred.affine, src.affine, atol=1e-3)
        assert set(np.unique(np.asarray(pred.dataobj)).tolist()) == {ids[task].organ_id}, task

    # training from image/label pairs only, with the configurable default task
    model_file = Path(server["bundle"]) / "models" / "model.pt"
    before = model_file.read_bytes()
    params = {
        "max_epochs": 1,
        "val_split": 0.5,
        "device": "cpu",
        "multi_gpu": False,
        "pretrained": True,
        "default_task": "liver",
    }
    try:
        _request(
            f"{server['base']}/train/{MODEL}?run_sync=true",
            data=json.dumps(params).encode(),
            headers={"Content-Type": "application/json"},
            timeout=REQUEST_TIMEOUT,
        )
    except urllib.error.HTTPError as e:
        pytest.fail(f"/train/{MODEL} failed: {e.code} {e.read()[:2000]!r}\n{server['log']()}")
    log = server["log"]()
    assert "Training Finished" in log, log
    assert model_file.read_bytes() != before, "training did not write models/model.pt"
    # the trained weights serve the next request
    pred = _infer(server, "example_ct_sm", {"tasks": "liver"})
    assert pred.shape == src.shape
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= {0, ids["liver"].organ_id, ids["liver"].tumor_id}
