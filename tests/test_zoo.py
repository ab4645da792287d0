"""Model Zoo readiness: the zoo CI's checks, the release zip, and a download over HTTP from 127.0.0.1.

Command-line tools run in subprocesses with ``PYTHONPATH=<bundle root>``, as the zoo CI runs them
(``verify_net_in_out``, ``ckpt_export`` and ``ConfigWorkflow`` never add the bundle to sys.path).
No weights are released yet, so tests build a tiny-width checkpoint themselves and override
``network_def#base_channels`` consistently.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Dict, Iterator, List

import numpy as np
import pytest
import torch
from helpers.paths import TOOLS_DIR
from release import BUNDLE_NAME, ReleaseError, build, bundle_files, check_bundle, verify_zip

from scripts.networks import DoDNet

TINY = {"base_channels": 8}
RELEASE_TOOL = TOOLS_DIR / "release.py"
TIMEOUT = 300


def _env(bundle_root: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(bundle_root)
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _monai_bundle(bundle_root: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args],
        cwd=cwd,
        env=_env(bundle_root),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, f"monai.bundle {args[0]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    torch.save(DoDNet(**TINY).state_dict(), path)
    return path


def test_license_present(bundle_root):
    text = (bundle_root / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0" in text


def test_large_files_entries_follow_zoo_format(bundle_root):
    import yaml

    entries = yaml.safe_load((bundle_root / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt"]
    for entry in entries:
        assert set(entry) == {"path", "url", "hash_val", "hash_type"}
        assert entry["hash_type"] in ("md5", "sha1", "sha256", "sha512")
        assert bool(entry["url"]) == bool(entry["hash_val"]), "a released file needs both url and hash_val"
        if not entry["url"]:  # not released yet: the bundle must not pretend to ship it
            assert (
                not (bundle_root / entry["path"]).is_file()
                or "models/*.pt" in (bundle_root.parent / ".gitignore").read_text()
            )


def test_data_license_names_each_source_license(bundle_root):
    text = (bundle_root / "docs" / "data_license.txt").read_text()
    for source, terms in (("LiTS", "CC BY-NC-SA 4.0"), ("KiTS19", "CC BY-NC-SA 4.0"), ("Decathlon", "CC BY-SA 4.0")):
        block = text[text.index(source) :]
        assert terms in block[: block.index("Cite:")], source


def test_version_listed_in_changelog(bundle_root):
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    assert check_bundle(bundle_root) == meta["version"]


def test_check_bundle_names_missing_license_and_changelog(tmp_path, bundle_root):
    copy = tmp_path / BUNDLE_NAME
    shutil.copytree(bundle_root, copy, ignore=shutil.ignore_patterns("__pycache__", "models", ".cache"))
    (copy / "LICENSE").unlink()
    with pytest.raises(ReleaseError, match="missing required bundle file.*LICENSE"):
        check_bundle(copy)
    (copy / "LICENSE").write_text("license")
    meta = json.loads((copy / "configs" / "metadata.json").read_text())
    meta["version"] = "9.9.9"
    (copy / "configs" / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(ReleaseError, match="version 9.9.9 is not listed in 'changelog'"):
        check_bundle(copy)


def test_verify_metadata_against_schema(bundle_root, schema_path, tmp_path):
    _monai_bundle(
        bundle_root,
        "verify_metadata",
        "--meta_file",
        str(bundle_root / "configs" / "metadata.json"),
        "--filepath",
        str(schema_path),
        cwd=tmp_path,
    )
    # the same check fails on metadata lacking a required field, so it is a real check
    meta = json.loads((bundle_root / "configs" / "metadata.json").read_text())
    del meta["network_data_format"]
    bad = tmp_path / "bad_metadata.json"
    bad.write_text(json.dumps(meta))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            str(bad),
            "--filepath",
            str(schema_path),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode != 0 and "network_data_format" in proc.stdout + proc.stderr


def test_verify_net_in_out(bundle_root, tmp_path):
    proc = _monai_bundle(
        bundle_root,
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(bundle_root / "configs" / "metadata.json"),
        "--config_file",
        str(bundle_root / "configs" / "inference.json"),
        cwd=tmp_path,
    )
    assert "data shape of network is verified with no error" in proc.stdout + proc.stderr


def test_ckpt_export_torchscript_equals_eager(bundle_root, tiny_checkpoint, tmp_path):
    ts_path = tmp_path / "model.ts"
    _monai_bundle(
        bundle_root,
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts_path),
        "--ckpt_file",
        str(tiny_checkpoint),
        "--meta_file",
        str(bundle_root / "configs" / "metadata.json"),
        "--config_file",
        str(bundle_root / "configs" / "inference.json"),
        "--network_def#base_channels",
        str(TINY["base_channels"]),
        cwd=tmp_path,
    )
    scripted = torch.jit.load(str(ts_path), map_location="cpu").eval()
    eager = DoDNet(**TINY).eval()
    eager.load_state_dict(torch.load(tiny_checkpoint, map_location="cpu", weights_only=True))
    x = torch.randn(2, 1, 32, 32, 16, generator=torch.Generator().manual_seed(3))
    # optimized_execution(False): skip TorchScript's profiling re-compiles (seconds each on a CPU)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        expected_all = eager(x)
        assert expected_all.shape == (2, 14, 32, 32, 16)
        assert torch.allclose(scripted(x), expected_all, atol=1e-5)
        for task in range(7):
            tid = torch.tensor([task])
            out = scripted(x, tid)
            assert torch.allclose(out, eager(x, tid), atol=1e-5), task
            assert torch.allclose(out, expected_all[:, 2 * task : 2 * task + 2], atol=1e-5), task
        mixed = torch.tensor([[1, 6], [4, 0]])
        assert torch.allclose(scripted(x, mixed), eager(x, mixed), atol=1e-5)


def _workflow_properties(
    bundle_root: Path, workflow_type: str, config_files: List[str], overrides: Dict[str, object], tmp_path: Path
) -> list:
    """``ConfigWorkflow(...)`` then ``initialize()`` and ``check_properties()``, as the zoo's bundle tests do.

    Runs in a subprocess with ``PYTHONPATH`` = bundle root; returns the list of missing properties.
    """
    code = (
        "import json, sys\n"
        "from monai.bundle import ConfigWorkflow\n"
        "wf = ConfigWorkflow(config_file=json.loads(sys.argv[1]), meta_file=sys.argv[2], logging_file=sys.argv[3],\n"
        "                    workflow_type=sys.argv[4], **json.loads(sys.argv[5]))\n"
        "wf.initialize()\n"
        "print('MISSING=' + json.dumps(wf.check_properties()))\n"
    )
    configs = bundle_root / "configs"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            json.dumps([str(configs / f) for f in config_files]),
            str(configs / "metadata.json"),
            str(configs / "logging.conf"),
            workflow_type,
            json.dumps(overrides),
        ],
        cwd=tmp_path,
        env=_env(bundle_root),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("MISSING="))
    return json.loads(line[len("MISSING=") :])


def test_train_workflow_properties(bundle_root, tmp_path):
    from helpers.tiny_mots import write_tiny_mots

    datalist = write_tiny_mots(tmp_path / "data", train_tasks=("liver", "spleen"), val_tasks=("colon",))
    overrides = {
        "bundle_root": str(tmp_path / "run"),
        "dataset_dir": str(tmp_path / "data"),
        "datalist": str(datalist),
        "epochs": 1,
        "patch_size": [32, 32, 16],
        "num_workers": 0,
        "network_def#base_channels": TINY["base_channels"],
    }
    missing = _workflow_properties(bundle_root, "train", ["train.json"], overrides, tmp_path)
    assert missing == [], f"train workflow lacks required properties: {missing}"


def test_infer_workflow_properties(bundle_root, tmp_path):
    from helpers.tiny_mots import make_case, write_nifti

    from scripts.tasks import resolve_task

    image, _ = make_case(resolve_task("liver"), (40, 40, 20))
    write_nifti(tmp_path / "data" / "case_000.nii.gz", image)
    overrides = {
        "bundle_root": str(tmp_path / "run"),
        "dataset_dir": str(tmp_path / "data"),
        "patch_size": [32, 32, 16],
        "network_def#base_channels": TINY["base_channels"],
    }
    missing = _workflow_properties(bundle_root, "infer", ["inference.json"], overrides, tmp_path)
    assert missing == [], f"infer workflow lacks required properties: {missing}"


# ---- release zip ----------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_release_zip_layout_and_reproducibility(bundle_root, tmp_path):
    copy = tmp_path / "src" / BUNDLE_NAME
    shutil.copytree(bundle_root, copy, ignore=shutil.ignore_patterns(".cache", "models", "eval", "runs"))
    (copy / "scripts" / "__pycache__").mkdir(exist_ok=True)
    (copy / "scripts" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"cache")
    (copy / "models").mkdir(exist_ok=True)
    (copy / "models" / "model.pt").write_bytes(b"weights")
    (copy / "eval").mkdir(exist_ok=True)
    (copy / "eval" / "metrics.csv").write_text("run output")
    first = Path(build(str(copy), str(tmp_path / "a")))
    version = check_bundle(copy)
    assert first.name == f"{BUNDLE_NAME}_v{version}.zip"
    got_version, names = verify_zip(str(first))
    assert got_version == version
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    assert f"{BUNDLE_NAME}/LICENSE" in names and f"{BUNDLE_NAME}/configs/metadata.json" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") or "/models/" in n or "/eval/" in n for n in names)
    assert names == sorted(names)
    assert [n.split("/", 1)[1] for n in names] == bundle_files(copy)
    with zipfile.ZipFile(first) as zf:
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    # new file times give the same bytes
    for path in copy.rglob("*"):
        os.utime(path, (1_700_000_000, 1_700_000_000))
    second = Path(build(str(copy), str(tmp_path / "b")))
    assert _sha256(first) == _sha256(second)
    with_weights = Path(build(str(copy), str(tmp_path / "c"), include_weights=True))
    assert f"{BUNDLE_NAME}/models/model.pt" in zipfile.ZipFile(with_weights).namelist()


def test_verify_zip_rejects_zip_without_top_level_folder(bundle_root, tmp_path):
    bad = tmp_path / f"{BUNDLE_NAME}_v0.1.0.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.write(bundle_root / "LICENSE", "LICENSE")
        zf.write(bundle_root / "configs" / "metadata.json", "configs/metadata.json")
    with pytest.raises(ReleaseError, match=r"must lie under one top-level folder 'dodnet_bundle/'.*'LICENSE'"):
        verify_zip(str(bad))
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as zf:
        zf.writestr("dodnet_bundle/LICENSE", "x")
    with pytest.raises(ReleaseError, match="missing required file"):
        verify_zip(str(other))
    not_zip = tmp_path / "plain.zip"
    not_zip.write_text("hello")
    with pytest.raises(ReleaseError, match="plain.zip: not a zip file"):
        verify_zip(str(not_zip))


def test_release_cli(bundle_root, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(RELEASE_TOOL), "build", "--output_dir", str(tmp_path)],
        cwd=bundle_root.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    (zip_path,) = tmp_path.glob(f"{BUNDLE_NAME}_v*.zip")
    proc = subprocess.run(
        [sys.executable, str(RELEASE_TOOL), "verify", str(zip_path)],
        cwd=bundle_root.parent,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr


# ---- download over HTTP ---------------------------------------------------------------------------------


@pytest.fixture
def http_server(tmp_path) -> Iterator[tuple]:
    """A threading HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (folder, base url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args, **kwargs: None  # quiet
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_download_from_local_http_then_run_network(bundle_root, tiny_checkpoint, http_server, tmp_path):
    www, base_url = http_server
    zip_path = Path(build(str(bundle_root), str(www)))
    target = tmp_path / "downloaded"
    _monai_bundle(
        bundle_root,
        "download",
        "--name",
        BUNDLE_NAME,
        "--url",
        f"{base_url}/{zip_path.name}",
        "--bundle_dir",
        str(target),
        cwd=tmp_path,
    )
    downloaded = target / BUNDLE_NAME
    assert (downloaded / "configs" / "inference.json").is_file() and (downloaded / "LICENSE").is_file()
    assert sorted(bundle_files(downloaded)) == bundle_files(bundle_root)
    (downloaded / "models").mkdir(exist_ok=True)
    shutil.copy(tiny_checkpoint, downloaded / "models" / "model.pt")
    # build the network from the downloaded copy only (its own scripts package) and run every task
    code = (
        "import sys, torch, scripts\n"
        "from monai.bundle import ConfigParser\n"
        "root = sys.argv[1]\n"
        "assert scripts.__file__.startswith(root), scripts.__file__\n"
        "p = ConfigParser(); p.read_config(root + '/configs/inference.json'); p['bundle_root'] = root\n"
        "p['network_def#base_channels'] = 8\n"
        "net = p.get_parsed_content('network_def')\n"
        "net.load_state_dict(torch.load(root + '/models/model.pt', weights_only=True)); net.eval()\n"
        "with torch.no_grad(): out = net(torch.zeros(1, 1, 32, 32, 16))\n"
        "print('SHAPE', tuple(out.shape))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(downloaded)],
        cwd=tmp_path,
        env=_env(downloaded),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SHAPE (1, 14, 32, 32, 16)" in proc.stdout

    # full inference with the downloaded bundle's own inference.json, as a user would run it
    import nibabel as nib
    from helpers.tiny_mots import make_case, write_nifti

    from scripts.tasks import resolve_task

    image, _ = make_case(resolve_task("kidney"), (40, 40, 20))
    write_nifti(tmp_path / "cases" / "case_007.nii.gz", image)
    _monai_bundle(
        downloaded,
        "run",
        "--config_file",
        "configs/inference.json",
        "--dataset_dir",
        str(tmp_path / "cases"),
        "--output_dir",
        str(tmp_path / "out"),
        "--patch_size",
        "[32, 32, 16]",
        "--network_def#base_channels",
        "8",
        "--progress",
        "False",
        cwd=downloaded,
    )
    seg = nib.load(str(tmp_path / "out" / "case_007_seg.nii.gz"))
    src = nib.load(str(tmp_path / "cases" / "case_007.nii.gz"))
    assert seg.shape == src.shape and np.allclose(seg.affine, src.affine, atol=1e-4)
    assert set(np.unique(np.asarray(seg.dataobj)).tolist()) <= set(range(12))
