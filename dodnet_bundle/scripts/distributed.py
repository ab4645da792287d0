"""The end of the process group in the distributed configs (``multi_gpu_train.json``, ``multi_gpu_evaluate.json``,
``mgpu_inference.json``; one process per GPU under torchrun), and what their start must do first.

A process group that outlives ``destroy_process_group`` keeps its gloo threads running until the interpreter
shuts down, and a rank can then abort at exit ("terminate called without an active exception", SIGABRT) after
all its work is done. Two things keep it alive:

- torch modules that bind the default group as a default argument (``group=group.WORLD``) when they are first
  imported, which ``DistributedDataParallel`` (through ``torch._dynamo``) and Ignite do after the group started.
  The configs' ``initialize`` imports them (``BIND_GROUP_AT_IMPORT``) before ``init_process_group``, when the
  default is still ``None`` (the default group, looked up at each call). That is plain torch on purpose:
  ``monai.bundle run`` puts the bundle folder on sys.path (``scripts`` importable) only after ``initialize``;
- the ``DistributedDataParallel`` wrapper (its process group, gradient reducer and logger), which the config
  keeps until the process ends: ``end_process_group`` releases them.

The group's threads then stop when ``end_process_group`` returns (``tests/test_distributed.py``).
"""

from __future__ import annotations

import gc
from typing import Any, Optional

__all__ = ["BIND_GROUP_AT_IMPORT", "end_process_group"]

BIND_GROUP_AT_IMPORT = ("torch.distributed.nn", "torch.distributed.optim", "torch.distributed.fsdp.sharded_grad_scaler")
"""The torch modules whose functions take ``group.WORLD`` as a default argument, evaluated at their import."""


def end_process_group(network: Optional[Any] = None) -> None:
    """Wait for every rank (one still saving a checkpoint or gathering metrics keeps the group in use), release
    ``network``'s hold on the group, end Ignite's distributed context and destroy the default process group.
    No-op without a running group.

    Args:
        network: the ``DistributedDataParallel`` wrapper the config trained, if any; it cannot run a training
            step afterwards (its gradient reducer is gone).
    """
    import ignite.distributed as idist
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if not dist.is_initialized():
        return
    dist.barrier()
    if isinstance(network, DistributedDataParallel):
        network.reducer = network.logger = network.process_group = None  # each holds the group
        gc.collect()
    idist.finalize()  # destroys the group when Ignite adopted it (idist.sync)
    if dist.is_initialized():
        dist.destroy_process_group()
