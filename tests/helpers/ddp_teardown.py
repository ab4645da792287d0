"""One torchrun rank: start the process group as the distributed configs do, train one DistributedDataParallel
step on CPU (gloo), end the group, and write ``<folder>/<rank>.json``: the gloo threads seen while the group
ran and those still running after it ended. Usage: ``torchrun --nproc_per_node=2 ddp_teardown.py <folder>``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "dodnet_bundle"))

import importlib  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from scripts.distributed import BIND_GROUP_AT_IMPORT, end_process_group  # noqa: E402


def gloo_threads() -> list:
    names = (Path("/proc/self/task") / task / "comm" for task in os.listdir("/proc/self/task"))
    return sorted(name for name in (path.read_text().strip() for path in names) if "gloo" in name)


if __name__ == "__main__":
    for name in BIND_GROUP_AT_IMPORT:
        importlib.import_module(name)
    dist.init_process_group(backend="gloo")
    import ignite.distributed  # noqa: F401, E402  (imported after the group started, as in a bundle run)
    import torch._dynamo  # noqa: F401, E402  (as DistributedDataParallel's constructor does)

    running = gloo_threads()
    network = DistributedDataParallel(torch.nn.Linear(4, 2))
    network(torch.randn(3, 4)).sum().backward()
    end_process_group(network)
    report = {"while_running": running, "after_end": gloo_threads()}
    (Path(sys.argv[1]) / f"{os.environ['RANK']}.json").write_text(json.dumps(report))
