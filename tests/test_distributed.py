"""The distributed configs' process-group helpers: every gloo thread stops when the group ends, so no rank can
abort at interpreter exit after its work is done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.paths import REPO_ROOT

from scripts.distributed import end_process_group

CHILD = Path(__file__).parent / "helpers" / "ddp_teardown.py"


def test_end_without_a_group_is_a_no_op():
    import torch.distributed as dist

    assert not dist.is_initialized()
    end_process_group()
    assert not dist.is_initialized()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads through /proc (Linux only)")
def test_ending_the_group_stops_its_threads_after_distributed_data_parallel(tmp_path):
    """DistributedDataParallel imports torch.distributed.nn after the group started; imported then, its default
    arguments would hold the group and its gloo threads until interpreter shutdown."""
    env = {k: v for k, v in os.environ.items() if "TORCHINDUCTOR" not in k}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        str(CHILD),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"{rank}.json").read_text())
        assert report["while_running"], "no gloo thread seen while the group ran: the check would prove nothing"
        assert report["after_end"] == [], f"rank {rank}: {report}"
