"""User mistakes and environment surprises end in one clear line, and the embedded default works on a fresh checkout.

Subprocess runs use the commands exactly as users type them, with a tiny network and one thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from helpers.inference import affine_for, phantom, run_workflow, save_checkpoint, tiny_dodnet, write_nifti
from helpers.paths import BUNDLE_ROOT

from scripts.inference.cli import segment_main

RUN_TIMEOUT_S = 600


def _env() -> Dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="default")
    env.pop("DODNET_BUNDLE_ROOT", None)
    return env


def _fresh_bundle(tmp_path: Path) -> Path:
    """A bundle folder as a new clone has it: configs and scripts, no .cache, no models, no eval."""
    root = tmp_path / "dodnet_bundle"
    root.mkdir()
    for name in ("configs", "scripts", "LICENSE"):
        (root / name).symlink_to(BUNDLE_ROOT / name)
    return root


def test_training_on_the_embedded_default_from_a_cold_cache(tmp_path):
    """``monai.bundle run`` from the bundle folder, relative bundle_root, no MOTS-synth yet: generates and trains.

    The datalist check reads headers in threads while ITK loads its modules lazily, which changes the working
    directory for a moment; relative paths then were "not found" on the first run only.
    """
    root = _fresh_bundle(tmp_path)
    synth = {"num_per_task": 2, "num_val_per_task": 1, "num_test_per_task": 0}
    args: List[str] = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
        "--epochs", "1", "--network_def#base_channels", "4", "--patch_size", "[32,32,16]",
        "--num_workers", "0", "--val_interval", "1", "--synth_options", json.dumps(synth),
    ]  # fmt: skip
    result = subprocess.run(
        args, cwd=root, env=_env(), capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unusable" not in result.stderr
    datalists = list((root / ".cache" / "mots_synth").glob("*/datalist.json"))
    assert len(datalists) == 1 and len(json.loads(datalists[0].read_text())["training"]) == 14
    assert (root / "models" / "model.pt").is_file()
    assert list((root / "models").glob("checkpoint_epoch=1.pt"))


def test_datalist_check_survives_a_working_directory_change_in_a_reader_thread(tmp_path, monkeypatch):
    """A relative datalist is checked against the working directory of the call, whatever ITK does meanwhile
    (simulated: the first header read moves the process elsewhere, as ITK's LibraryLoader does for a moment)."""
    from helpers.tiny_mots import write_tiny_mots

    import scripts.data.datalist as datalist

    write_tiny_mots(tmp_path / "data", shape=(24, 24, 12))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    real = datalist.read_header

    def read_header_moving_cwd(path):
        os.chdir(tmp_path / "elsewhere")
        return real(path)

    monkeypatch.setattr(datalist, "read_header", read_header_moving_cwd)
    items = datalist.load_datalist(dataset_dir="data", split="training", num_workers=2)
    assert items and all(Path(item["image"]).is_absolute() and Path(item["image"]).is_file() for item in items)


TINY = ["--network_def#base_channels", "8", "--network_def#norm_groups", "8", "--network_def#blocks", "[1,1,1,1,1]"]


@pytest.fixture()
def ct(tmp_path):
    return write_nifti(tmp_path / "ct.nii.gz", phantom(), affine_for((0.8, 0.8, 1.5)))


def _segment(args, capsys):
    """Run dodnet-segment in-process; returns (exit code, stderr lines)."""
    with pytest.raises(SystemExit) as exit_info:
        segment_main([str(a) for a in args] + ["--progress", "False"] + TINY)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dodnet-segment")]
    return exit_info.value.code, err


@pytest.mark.parametrize("tasks", ["", ",", "[]"])
def test_empty_task_selection_is_a_usage_error_before_any_case(tmp_path, ct, capsys, tasks):
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")
    code, err = _segment([ct, tmp_path / "out", "--ckpt", ckpt, "--tasks", tasks], capsys)
    assert code == 2 and len(err) == 1 and "empty task selection" in err[0]
    assert not (tmp_path / "out" / "summary.json").exists()


def test_empty_task_selection_in_the_inference_config(tmp_path, ct):
    """``monai.bundle run --tasks ""`` of inference.json: the same rule, when the inferer is built (before cases)."""
    from scripts.tasks import TaskSelectionError
    from scripts.utils import root_cause

    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")
    tiny = {"network_def#base_channels": 8, "network_def#norm_groups": 8, "network_def#blocks": [1, 1, 1, 1, 1]}
    with pytest.raises(Exception) as info:
        run_workflow(str(ct), tmp_path / "out", ckpt, tasks="", **tiny)
    assert isinstance(root_cause(info.value), TaskSelectionError) and "empty task selection" in str(
        root_cause(info.value)
    )
    assert not (tmp_path / "out" / "summary.json").exists()


def test_unknown_and_duplicate_tasks_and_misspelled_options_are_refused(tmp_path, ct, capsys):
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")
    code, err = _segment([ct, tmp_path / "out", "--ckpt", ckpt, "--tasks", "livr"], capsys)
    assert code == 2 and err == [
        "dodnet-segment: error: unknown task 'livr' (did you mean 'liver'?); known tasks: liver, kidney, "
        "hepatic_vessel, pancreas, colon, lung, spleen"
    ]
    code, err = _segment([ct, tmp_path / "out", "--ckpt", ckpt, "--tasks", "liver,kidney,0"], capsys)
    assert code == 2 and len(err) == 1 and "names liver twice" in err[0]
    code, err = _segment([ct, tmp_path / "out", "--ckpt", ckpt, "--presicion", "bf16"], capsys)
    assert code == 2 and len(err) == 1 and "unknown option --presicion (did you mean --precision" in err[0]
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists()


def test_a_bad_args_file_is_one_line_naming_it(tmp_path, ct, capsys):
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "typo.json").write_text('{"network_def#base_chanels": 4}')
    (tmp_path / "broken.json").write_text('{"patch_size": [')
    for name, expected in (
        ("missing.json", "no such file"),
        ("list.json", "expected a mapping of config ids to values"),
        ("broken.json", "cannot read it as JSON or YAML"),
        ("typo.json", "unknown option --network_def#base_chanels"),
    ):
        code, err = _segment([ct, tmp_path / "out", "--ckpt", ckpt, "--args_file", tmp_path / name], capsys)
        assert code == 2 and len(err) == 1 and expected in err[0], err
        assert name in err[0] or "unknown option" in err[0]
    assert not (tmp_path / "out" / "ct_seg.nii.gz").exists()


def test_output_location_is_checked_before_the_first_case(tmp_path, ct, capsys):
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "model.pt")
    (tmp_path / "taken").write_text("a file where the output folder should be")
    code, err = _segment([ct, tmp_path / "taken", "--ckpt", ckpt], capsys)
    assert code == 2 and err == [
        f"dodnet-segment: error: {tmp_path / 'taken'}: is a file, not a folder (the output folder); "
        "pass another output folder"
    ]
    code, err = _segment([ct, tmp_path / "taken" / "sub", "--ckpt", ckpt], capsys)
    assert code == 2 and len(err) == 1 and "a parent of the output folder" in err[0]
    assert (tmp_path / "taken").read_text().startswith("a file")


def test_bad_checkpoints_end_in_one_line_with_the_fix(tmp_path, ct, capsys):
    wide = DoDNetOf(16)
    save_checkpoint(wide, tmp_path / "wide.pt")
    code, err = _segment([ct, tmp_path / "out", "--ckpt", tmp_path / "wide.pt"], capsys)
    assert code == 2 and len(err) == 1
    assert "wide.pt: the weights do not fit the network defined by network_def" in err[0]
    assert "pass --network_def#base_channels 16 (the checkpoint's width)" in err[0]
    good = save_checkpoint(tiny_dodnet(), tmp_path / "good.pt")
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, err = _segment([ct, tmp_path / "out", "--ckpt", tmp_path / "cut.pt"], capsys)
    assert code == 2 and len(err) == 1 and "cut.pt: refused to load" in err[0] and "truncated" in err[0]
    state = tiny_dodnet().state_dict()
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "extra.pt")
    code, err = _segment([ct, tmp_path / "out", "--ckpt", tmp_path / "extra.pt"], capsys)
    assert code == 2 and len(err) == 1 and "1 extra key(s) (e.g. extra.weight)" in err[0]
    assert not list((tmp_path / "out").glob("*_seg.nii.gz"))
    from scripts.utils import root_cause

    with pytest.raises(Exception) as info:  # --debug: the traceback, not one line
        segment_main([str(ct), str(tmp_path / "out"), "--ckpt", str(tmp_path / "extra.pt"), "--debug"] + TINY)
    assert "extra.weight" in str(root_cause(info.value))


def DoDNetOf(width: int):
    from scripts.networks import DoDNet

    torch.manual_seed(0)
    return DoDNet(base_channels=width, norm_groups=8, blocks=(1, 1, 1, 1, 1))


def test_other_commands_share_the_one_line_errors(tmp_path, capsys):
    from scripts.data.prepare_mots import main as prepare_main
    from scripts.evaluation.folders import main as evaluate_main
    from scripts.networks.convert_official_checkpoint import main as convert_main

    with pytest.raises(SystemExit) as info:
        evaluate_main([str(tmp_path / "nope"), str(tmp_path), str(tmp_path / "o")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("dodnet-evaluate: error: ") and "nope" in err[-1]
    (tmp_path / "cut.pth").write_bytes(b"PK\x03\x04 not a whole zip")
    with pytest.raises(SystemExit) as info:
        convert_main(["--src", str(tmp_path / "cut.pth"), "--dst", str(tmp_path / "m.pt")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("convert_official_checkpoint: error: ") and "cut.pth" in err[0]
    assert not (tmp_path / "m.pt").exists()
    with pytest.raises(SystemExit) as info:
        prepare_main(["--root", str(tmp_path / "no_root"), "--tasks", "livr"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("dodnet-prepare-mots: error: ")


# (module:entry point, its name in messages, a misspelled flag, the suggestion, the other arguments)
COMMANDS = [
    ("scripts.demo:main", "dodnet-demo", "--epoch", "--epochs", ["--output_dir", "{tmp}/out"]),
    (
        "scripts.inference.cli:segment_main",
        "dodnet-segment",
        "--save_mask",
        "--save_masks",
        ["{tmp}/in.nii.gz", "{tmp}/out"],
    ),
    ("scripts.evaluation.folders:main", "dodnet-evaluate", "--mappings", "--mapping", ["{tmp}", "{tmp}", "{tmp}/out"]),
    ("scripts.data.preprocess:main", "dodnet-preprocess", "--worker", "--workers", ["{tmp}/d.json", "{tmp}/out"]),
    ("scripts.data.prepare_mots:main", "dodnet-prepare-mots", "--rot", "--root", ["--output", "{tmp}/out/d.json"]),
    (
        "scripts.networks.convert_official_checkpoint:main",
        "convert_official_checkpoint",
        "--dest",
        "--dst",
        ["--src", "x"],
    ),
]


@pytest.mark.parametrize(
    "args",
    [
        ["x", "--tta", "--no_postprocess", "--noinfer"],
        ["x", "--noinfer", "--tta", "--no_postprocess"],
        ["x", "--tta=True", "--no_postprocess=True", "--infer=False"],
    ],
)
def test_flags_of_every_command_parse_as_fire_parses_them(args):
    """fire_call hands fire a (*args, **kwargs) function; bare boolean flags still mean what they say."""
    from scripts.cli_errors import fire_call

    def command(a, tta=False, no_postprocess=False, infer=True):
        return {"a": a, "tta": tta, "no_postprocess": no_postprocess, "infer": infer}

    result, arguments = fire_call("prog", command, args)
    assert result == {"a": "x", "tta": True, "no_postprocess": True, "infer": False} == arguments


def _entry_point(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("module, prog, typo, suggestion, rest", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_every_command_refuses_a_misspelled_flag_before_it_starts(
    tmp_path, capsys, module, prog, typo, suggestion, rest
):
    """fire alone would run the whole job and complain about the flag afterwards (or ignore it)."""
    main = _entry_point(module)
    args = [a.format(tmp=tmp_path) for a in rest] + [typo, "1"]
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: unknown option {typo} "), err
    assert f"did you mean {suggestion}" in err[0]
    assert not (tmp_path / "out").exists()  # nothing ran


@pytest.mark.parametrize("module, prog, typo, suggestion, rest", COMMANDS, ids=[c[1] for c in COMMANDS])
def test_every_command_has_help_with_its_flags(capfd, module, prog, typo, suggestion, rest):
    with pytest.raises(SystemExit) as info:
        _entry_point(module)(["--help"])
    assert info.value.code == 0
    captured = capfd.readouterr()
    out = captured.out + captured.err  # fire writes it to stderr when not on a terminal
    assert f"NAME\n    {prog}" in out and suggestion in out


def test_a_missing_argument_is_one_line_naming_it(tmp_path, capsys):
    from scripts.evaluation.folders import main

    with pytest.raises(SystemExit) as info:
        main([str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dodnet-evaluate: error: ") and "'reference_dir'" in err[0], err


def test_threads_default_to_the_affinity_share_and_are_applied_by_the_configs():
    import itk
    from monai.bundle import ConfigParser

    from scripts.utils import default_threads, set_threads

    assert default_threads() == len(os.sched_getaffinity(0))
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    assert itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
    with pytest.raises(ValueError, match="positive integer"):
        set_threads(-2)
    for name in ("train.json", "evaluate.json"):  # a run step: scripts is importable only after initialize
        config = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / name))
        (step,) = [s for s in config["run"] if "set_threads" in str(s)]
        assert {"_target_": "scripts.utils.set_threads", "threads": "@threads"}.items() <= step.items()
    for name in ("inference.json", "train.json"):
        config = ConfigParser.load_config_file(str(BUNDLE_ROOT / "configs" / name))
        assert config["threads"] is None and not any("set_threads" in str(step) for step in config["initialize"])
    set_threads(None)
    assert torch.get_num_threads() <= default_threads()


@pytest.mark.parametrize("configs", [["inference.json"], ["inference.json", "mgpu_inference.json"]])
def test_building_the_inferer_applies_threads_as_monai_label_builds_it(configs):
    """MONAI Label's BundleInferTask builds ``inferer`` (and ``network_def``, ``preprocessing``) from the parsed
    config without running ``initialize``: building the inferer sets the threads; null is the affinity share."""
    import itk
    from monai.bundle import ConfigParser

    from scripts.utils import default_threads, set_threads

    def build_inferer(threads):
        parser = ConfigParser()
        parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in configs])
        parser.update({"bundle_root": str(BUNDLE_ROOT), "threads": threads, "device": "$torch.device('cpu')"})
        return parser.get_parsed_content("inferer")

    try:
        set_threads(2)
        build_inferer(1)
        assert torch.get_num_threads() == 1 and itk.MultiThreaderBase.GetGlobalDefaultNumberOfThreads() == 1
        build_inferer(None)
        assert torch.get_num_threads() == min(default_threads(), int(os.environ.get("OMP_NUM_THREADS") or 10**6))
        with pytest.raises(Exception) as info:
            build_inferer(-3)
        assert "threads must be a positive integer, got -3" in str(info.value.__cause__ or info.value)
    finally:
        set_threads(None)


@pytest.mark.parametrize(
    "code",
    [
        "import scripts, itk; itk.ImageIOFactory",
        # ITK first loaded where a case's warnings are recorded (the inference runner): the interpreter's C-level
        # state then keeps that block's "always" filters until something refreshes it
        "import scripts, warnings, itk, numpy as np\n"
        "with warnings.catch_warnings(record=True):\n"
        "    warnings.simplefilter('always')\n"
        "    itk.image_from_array(np.zeros((4, 4, 4), np.float32))",
    ],
    ids=["plain", "inside-catch-warnings"],
)
def test_no_swig_warning_at_exit(code):
    result = subprocess.run(
        [sys.executable, "-W", "always", "-c", code], cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "swig" not in result.stderr.lower() and "refresh the warning filters" not in result.stderr, result.stderr


def test_no_nvimagecodec_warning_when_loading_with_pydicom_installed():
    """MONAI's LoadImage builds its nvImageCodec DICOM reader, which warns that the GPU decoder is missing."""
    pytest.importorskip("pydicom", reason="the warning comes only with pydicom installed")
    code = "import scripts; from monai.transforms import LoadImage; LoadImage(reader='ITKReader')"
    result = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True)
    assert result.returncode == 0 and "nvimagecodec" not in result.stderr.lower(), result.stderr


def test_permission_error_is_named_as_such(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their permission bits; the check needs an unprivileged user")
    from scripts.data.cases import BadInputError, check_input

    path = write_nifti(tmp_path / "locked.nii.gz", phantom(), affine_for((0.8, 0.8, 1.5)))
    path.chmod(0)
    with pytest.raises(BadInputError, match="permission denied"):
        check_input(path)


def test_nonfinite_counts_from_the_tensor_for_non_nifti(tmp_path):
    from monai.data import MetaTensor

    from scripts.data.cases import BadInputError, CheckCTImaged

    img = MetaTensor(torch.full((1, 4, 4, 4), float("inf")), meta={"filename_or_obj": "x.mha"})
    with pytest.raises(BadInputError, match=r"x.mha: 64 of 64 voxels are not finite \(0 NaN, 64 inf\)"):
        CheckCTImaged()({"image": img})
    assert np.isfinite(np.zeros(1)).all()


@pytest.mark.parametrize("debug", [False, True], ids=["one-line", "DODNET_DEBUG"])
def test_monai_bundle_run_ends_a_user_error_in_one_line(tmp_path, ct, debug):
    """python -m monai.bundle run of inference.json with a task that does not exist: one line naming the value and
    exit code 2 (the config's first run step installs the hook); DODNET_DEBUG=1 keeps MONAI's traceback."""
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k and k != "DODNET_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    if debug:
        env["DODNET_DEBUG"] = "1"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--input", str(ct), "--output_dir", str(tmp_path / "out"), "--tasks", "livr"]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if debug:
        assert proc.returncode != 0 and "Traceback" in proc.stderr
        return
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert line.startswith("monai.bundle run: error: ") and "livr" in line and "liver" in line


def test_monai_bundle_run_with_a_failed_case_exits_1_in_one_line(tmp_path):
    """A case that cannot be segmented (an empty file) under python -m monai.bundle run of inference.json: the
    other work is done, then one line naming the file, exit code 1."""
    bad = tmp_path / "empty.nii.gz"
    bad.write_bytes(b"")
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "tiny.pt")
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k and k != "DODNET_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/inference.json"]
    cmd += ["--input", str(bad), "--output_dir", str(tmp_path / "out"), "--ckpt_path", str(ckpt)]
    cmd += ["--network_def#base_channels", "8", "--network_def#norm_groups", "8", "--network_def#blocks", "[1,1,1,1,1]"]
    proc = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
    assert line.startswith("monai.bundle run: error: 1 of 1 case(s) failed") and str(bad) in line
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["failed"][0]["input"] == str(bad)
