"""Cohorts: resumable runs (a restarted run skips finished cases and redoes interrupted ones) and batch inference
over several processes with torchrun (each rank its own shard, one merged summary)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Dict, List

import nibabel as nib
import pytest
from helpers.inference import (
    TINY_NET,
    IntensityNet,
    affine_for,
    phantom,
    run_workflow,
    save_checkpoint,
    tiny_dodnet,
    write_nifti,
)
from helpers.paths import BUNDLE_ROOT

from scripts.inference.lock import LOCK_NAME, OutputFolderBusyError, output_folder_lock
from scripts.inference.runner import is_cohort_input, merge_summaries
from scripts.inference.writers import remove_stale_temporaries

TESTS_DIR = Path(__file__).resolve().parent


def _cohort(folder: Path, names: List[str]) -> Path:
    folder.mkdir(parents=True)
    for i, name in enumerate(names):
        write_nifti(folder / f"{name}.nii.gz", phantom((40 - 2 * i, 36, 20)), affine_for((0.8, 0.8, 1.5)))
    return folder


def _mtimes(folder: Path, case: str) -> Dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.glob(f"{case}_*")}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k}
    env["OMP_NUM_THREADS"] = "1"  # the test processes share two cores
    return env


def _killed_when_replacing(suffix: str, cohort: Path, out: Path, ckpt: Path) -> subprocess.CompletedProcess:
    """Run inference.json (liver, IntensityNet) over ``cohort`` in a child process that SIGKILLs itself as a file
    ending in ``suffix`` is about to take its final name (``os.replace``)."""
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path[:0] = [{str(TESTS_DIR)!r}, {str(BUNDLE_ROOT)!r}]
        real_replace = os.replace
        def replace(src, dst):
            if str(dst).endswith({suffix!r}):
                os.kill(os.getpid(), signal.SIGKILL)
            real_replace(src, dst)
        os.replace = replace
        from helpers.inference import IntensityNet, run_workflow
        run_workflow({str(cohort)!r}, {str(out)!r}, {str(ckpt)!r}, network_def=IntensityNet(), tasks="liver")
        """)
    return subprocess.run([sys.executable, "-c", child], env=_env(), capture_output=True, text=True, timeout=300)


def test_cohort_detection_and_summary_merge(tmp_path, real_ct):
    cohort = _cohort(tmp_path / "cohort", ["a"])
    assert is_cohort_input(str(cohort)) and is_cohort_input([str(cohort / "a.nii.gz"), str(cohort)])
    assert not is_cohort_input(str(cohort / "a.nii.gz"))
    assert not is_cohort_input(str(real_ct / "dicom-3slice"))  # a DICOM series folder is one case
    parts = [{"succeeded": [{"case": "c"}, {"case": "a"}], "failed": []}, {"succeeded": [{"case": "b"}]}]
    assert merge_summaries(parts) == {
        "succeeded": [{"case": "a"}, {"case": "b"}, {"case": "c"}],
        "failed": [],
        "skipped": [],
    }


def test_stale_temporaries_of_dead_processes_only(tmp_path):
    dead = tmp_path / f".tmp-{_dead_pid()}-0123abcd-x_seg.nii.gz"
    live = tmp_path / f".tmp-{os.getpid()}-0123abcd-y_seg.nii.gz"
    other = tmp_path / "x_seg.nii.gz"
    for p in (dead, live, other):
        p.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == [dead]
    assert live.exists() and other.exists() and not dead.exists()


@pytest.mark.slow
def test_restart_skips_finished_cases_and_redoes_a_case_killed_mid_write(tmp_path):
    """A run SIGKILLed while committing case b (its label map written, its report not yet renamed into place)
    leaves b without a report and a temporary file of a dead process; the restart skips a, redoes b, removes
    the temporary file; a run with other options redoes every case."""
    cohort = _cohort(tmp_path / "cohort", ["a", "b"])
    out = tmp_path / "out"
    ckpt = save_checkpoint(IntensityNet(), tmp_path / "stub.pt")
    # killed just before b's report (the commit marker) takes its final name
    killed = _killed_when_replacing("b_report.json", cohort, out, ckpt)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (out / "a_report.json").is_file() and (out / "b_seg.nii.gz").is_file()
    assert not (out / "b_report.json").exists() and not (out / "summary.json").exists()
    stale = list(out.glob(".tmp-*"))
    assert [p.name.endswith("b_report.json") for p in stale] == [True]
    finished_a = _mtimes(out, "a")

    summary = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver")
    assert [c["case"] for c in summary["skipped"]] == ["a"] and [c["case"] for c in summary["succeeded"]] == ["b"]
    assert summary["failed"] == [] and _mtimes(out, "a") == finished_a  # a untouched
    assert list(out.glob(".tmp-*")) == []
    report_b = json.loads((out / "b_report.json").read_text())
    assert report_b["structures"]["liver"]["voxels"] > 0 and set(report_b["outputs"]) == {"label_map", "report"}
    assert nib.load(str(out / "b_seg.nii.gz")).shape == (38, 36, 20)
    saved = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in saved["skipped"]] == ["a"]

    again = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver")
    assert [c["case"] for c in again["skipped"]] == ["a", "b"] and again["succeeded"] == []

    other = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver,spleen")
    assert [c["case"] for c in other["succeeded"]] == ["a", "b"] and other["skipped"] == []  # options changed
    masks = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver,spleen", save_masks=True)
    assert len(masks["succeeded"]) == 2  # writer settings changed
    plain = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver,spleen")
    assert len(plain["succeeded"]) == 2 and not list(out.glob("a_*_mask.nii.gz"))  # old outputs replaced as a unit
    forced = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver,spleen", skip_existing=False)
    assert len(forced["succeeded"]) == 2 and forced["skipped"] == []
    single = run_workflow(str(cohort / "a.nii.gz"), out, ckpt, network_def=IntensityNet(), tasks="liver,spleen")
    assert len(single["succeeded"]) == 1  # "auto" resumes folder inputs only


def test_new_weights_redo_finished_cases(tmp_path):
    cohort = _cohort(tmp_path / "cohort", ["a"])
    ckpt = save_checkpoint(IntensityNet(), tmp_path / "stub.pt")
    first = run_workflow(str(cohort), tmp_path / "out", ckpt, network_def=IntensityNet(), tasks="liver")
    assert len(first["succeeded"]) == 1
    save_checkpoint(IntensityNet(organ_level=0.2), ckpt)
    os.utime(ckpt, ns=(os.stat(ckpt).st_atime_ns, os.stat(ckpt).st_mtime_ns + 10**9))
    second = run_workflow(str(cohort), tmp_path / "out", ckpt, network_def=IntensityNet(), tasks="liver")
    assert len(second["succeeded"]) == 1 and second["skipped"] == []


def _torchrun() -> List[str]:
    exe = Path(sys.executable).parent / "torchrun"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


@pytest.mark.slow
def test_torchrun_two_gloo_processes_shard_the_cases_and_merge_one_summary(tmp_path):
    """5 cases (one a corrupt file) over 2 ranks: each good case written once by the rank whose shard holds it,
    one summary.json naming the bad file; a second launch skips the 4 finished cases."""
    cohort = _cohort(tmp_path / "cohort", ["a_ct", "b_ct", "c_ct", "d_ct"])
    (cohort / "bad.nii.gz").write_bytes(b"this is not a gzip stream")
    out = tmp_path / "out"
    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "tiny.pt")
    overrides = {**TINY_NET, "ckpt_path": str(ckpt), "tasks": "liver", "patch_size": [48, 48, 32]}
    cmd = _torchrun() + ["--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run"]
    cmd += ["--config_file", "['configs/inference.json','configs/mgpu_inference.json']"]
    cmd += ["--input", str(cohort), "--output_dir", str(out)]
    for key, value in overrides.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]

    def launch() -> Dict:
        result = subprocess.run(cmd, cwd=BUNDLE_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        log = result.stdout + result.stderr
        assert result.returncode != 0, log[-3000:]  # fail_on_error: the bad case fails the launch...
        assert "1 of 5 case(s) failed" in log and (out / "summary.json").is_file(), log[-3000:]
        return json.loads((out / "summary.json").read_text())  # ...after every other case was written

    summary = launch()
    assert summary["world_size"] == 2
    succeeded = {c["case"]: c for c in summary["succeeded"]}
    assert sorted(succeeded) == ["a_ct", "b_ct", "c_ct", "d_ct"] and len(summary["succeeded"]) == 4
    # find_cases sorts by name (a_ct, b_ct, bad, c_ct, d_ct); partition_dataset deals them out in turn
    assert {case: c["rank"] for case, c in succeeded.items()} == {"a_ct": 0, "c_ct": 1, "d_ct": 0, "b_ct": 1}
    assert all(c["seconds"] > 0 for c in succeeded.values())
    assert [(f["case"], f["rank"]) for f in summary["failed"]] == [("bad", 0)]
    assert str(cohort / "bad.nii.gz") in summary["failed"][0]["error"]
    for case in succeeded:
        assert nib.load(str(out / f"{case}_seg.nii.gz")).shape == nib.load(str(cohort / f"{case}.nii.gz")).shape
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json"] + [f"{c}_{s}" for c in succeeded for s in ("seg.nii.gz", "report.json")]
    )  # nothing else: no output of the bad case, no temporary file
    written = {case: _mtimes(out, case) for case in succeeded}

    again = launch()
    assert sorted(c["case"] for c in again["skipped"]) == sorted(succeeded) and again["succeeded"] == []
    assert [f["case"] for f in again["failed"]] == ["bad"]
    assert {case: _mtimes(out, case) for case in succeeded} == written  # written once each


def test_mgpu_config_merges_on_inference_json():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(
        [str(BUNDLE_ROOT / "configs" / "inference.json"), str(BUNDLE_ROOT / "configs/mgpu_inference.json")]
    )
    assert parser["evaluator"]["dataset"] == "@dataset" and parser["dataset"]["data"] == "@cases"
    assert "partition_dataset" in parser["cases"] and parser["all_cases"]["_target_"] == "scripts.data.find_cases"
    assert any("init_process_group" in step for step in parser["initialize"])
    assert parser["skip_existing"] == "auto" and parser["output_type"] == "nifti"


def _held_run(cohort: Path, out: Path, ckpt: Path, started: Path, release: Path) -> subprocess.Popen:
    """A run into ``out`` in its own process that stops before its first case until ``release`` exists."""
    child = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path[:0] = [{str(TESTS_DIR)!r}, {str(BUNDLE_ROOT)!r}]
        from scripts.inference.runner import SegmentationRunner
        real_run_case = SegmentationRunner.run_case
        def run_case(self, index, options=None):
            Path({str(started)!r}).touch()
            while not Path({str(release)!r}).exists():
                time.sleep(0.05)
            return real_run_case(self, index, options)
        SegmentationRunner.run_case = run_case
        from helpers.inference import IntensityNet, run_workflow
        run_workflow({str(cohort)!r}, {str(out)!r}, {str(ckpt)!r}, network_def=IntensityNet(), tasks="liver")
        """)
    return subprocess.Popen([sys.executable, "-c", child], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-3000:]
        assert time.monotonic() < deadline, f"{path} not created"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_run_into_a_busy_output_folder_is_refused_and_the_first_keeps_its_records(tmp_path):
    """Two processes against one folder: the second (dodnet-segment) ends with one line naming the folder and the
    first one's pid before any case; the first finishes and its summary.json lists all its cases."""
    cohort = _cohort(tmp_path / "cohort", ["a", "b"])
    out = tmp_path / "out"
    ckpt = save_checkpoint(IntensityNet(), tmp_path / "stub.pt")
    started, release = tmp_path / "started", tmp_path / "release"
    first = _held_run(cohort, out, ckpt, started, release)
    try:
        _wait_for(started, first)
        tiny = save_checkpoint(tiny_dodnet(), tmp_path / "tiny.pt")
        second = subprocess.run(
            [sys.executable, "-c", "import sys; from scripts.inference.cli import segment_main; segment_main()"]
            + [str(cohort), str(out), "--ckpt", str(tiny), "--tasks", "spleen", "--progress", "False"]
            + [arg for k, v in TINY_NET.items() for arg in (f"--{k}", json.dumps(v))],
            cwd=BUNDLE_ROOT,
            env=_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        errors = [line for line in second.stderr.splitlines() if line.startswith("dodnet-segment")]
        assert second.returncode == 2 and errors == [
            f"dodnet-segment: error: {out}: another run is writing into this output folder "
            f"(pid {first.pid} on host {socket.gethostname()}); wait for it to finish or pass another output folder"
        ], second.stderr[-3000:]
    finally:
        release.touch()
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["succeeded"]] == ["a", "b"] and summary["options"]["tasks"] == ["liver"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json"] + [f"{c}_{s}" for c in "ab" for s in ("seg.nii.gz", "report.json")]
    )  # the lock file went with the run; no output of the refused run


@pytest.mark.slow
def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    cohort = _cohort(tmp_path / "cohort", ["a"])
    out = tmp_path / "out"
    ckpt = save_checkpoint(IntensityNet(), tmp_path / "stub.pt")
    killed = _held_run(cohort, out, ckpt, tmp_path / "started", tmp_path / "never")
    try:
        _wait_for(tmp_path / "started", killed)
        assert (out / LOCK_NAME).read_text().split()[0] == str(killed.pid)
    finally:
        killed.kill()
        killed.communicate(timeout=60)
    assert (out / LOCK_NAME).exists()  # left behind by the dead run, its kernel lock gone with it
    summary = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver")
    assert [c["case"] for c in summary["succeeded"]] == ["a"] and not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_and_released(tmp_path):
    with output_folder_lock(tmp_path / "out"):
        with pytest.raises(OutputFolderBusyError, match=f"{tmp_path / 'out'}: another run .*pid {os.getpid()} "):
            with output_folder_lock(tmp_path / "out"):
                pass
    assert list((tmp_path / "out").iterdir()) == []
    with output_folder_lock(tmp_path / "out"):  # free again
        pass


@pytest.mark.slow
def test_a_rerun_with_other_options_killed_mid_case_leaves_no_mixed_folder(tmp_path):
    """Masks written by run 1; run 2 without masks is SIGKILLed while writing the new label map (the old report
    already retired); run 3 without masks: the case holds its new label map and report and no old mask."""
    cohort = _cohort(tmp_path / "cohort", ["a"])
    out = tmp_path / "out"
    ckpt = save_checkpoint(IntensityNet(), tmp_path / "stub.pt")
    first = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver", save_masks=True)
    masks = sorted(p.name for p in out.glob("a_*_mask.nii.gz"))
    assert len(first["succeeded"]) == 1 and masks == ["a_liver_mask.nii.gz", "a_liver_tumor_mask.nii.gz"]
    # killed as the new label map takes its final name
    killed = _killed_when_replacing("a_seg.nii.gz", cohort, out, ckpt)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "a_report.json").exists() and (out / "a_liver_mask.nii.gz").exists()  # retired, not replaced

    third = run_workflow(str(cohort), out, ckpt, network_def=IntensityNet(), tasks="liver")
    assert [c["case"] for c in third["succeeded"]] == ["a"]
    report = json.loads((out / "a_report.json").read_text())
    assert set(report["outputs"]) == {"label_map", "report"} and report["writer"]["save_masks"] is False
    assert sorted(p.name for p in out.iterdir()) == ["a_report.json", "a_seg.nii.gz", "summary.json"]
