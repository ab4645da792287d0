"""Resuming training: the checkpoint a killed run restarts from, a best-model saver whose tracking survives, and the
evaluator's best metric carried over (so a resumed run logs "new best" only for a better score)."""

from __future__ import annotations

import logging
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver

__all__ = [
    "LAST_CHECKPOINT_PATTERN",
    "latest_checkpoint",
    "BestModelSaver",
    "LastCheckpointSaver",
    "EvaluatorBestMetric",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT_PATTERN = r"^checkpoint_epoch=(\d+)\.pt$"
"""Names written by ``CheckpointSaver(save_interval=1, epoch_level=True)`` without ``file_prefix``."""


def latest_checkpoint(ckpt_dir: Union[str, os.PathLike], pattern: str = LAST_CHECKPOINT_PATTERN) -> Optional[str]:
    """The complete epoch checkpoint with the highest epoch in ``ckpt_dir``, or None when there is none.

    Files named by ``pattern`` (a regular expression whose first group is the epoch) are candidates.
    ``CheckpointSaver`` writes in place, so a run killed while saving can leave a truncated file; a
    candidate counts only when it is a complete ``torch.save`` archive (its zip directory is
    present), and the previous epoch's file is used otherwise.
    """
    folder = Path(ckpt_dir)
    if not folder.is_dir():
        return None
    regex = re.compile(pattern)
    candidates: List[Tuple[int, Path]] = []
    for path in folder.iterdir():
        match = regex.match(path.name)
        if match and path.is_file():
            candidates.append((int(match.group(1)), path))
    for _, path in sorted(candidates, reverse=True):
        if zipfile.is_zipfile(path):
            return str(path)
    return None


class BestModelSaver(CheckpointSaver):
    """``CheckpointSaver`` of the best key-metric model whose tracking state can be checkpointed.

    MONAI's saver can restore which score is the best so far (``load_state_dict``) but only by
    storing it inside the best model file, which would then no longer be a plain ``state_dict``.
    ``state_dict()`` lets the epoch checkpoint carry it instead, so a resumed run does not
    overwrite ``model.pt`` with a worse model.
    """

    def state_dict(self) -> Dict[str, Any]:
        checkpoint = self._key_metric_checkpoint
        return checkpoint.state_dict() if checkpoint is not None else {"saved": []}


class LastCheckpointSaver(CheckpointSaver):
    """``CheckpointSaver`` of the full training state every ``save_interval`` epochs that keeps one file.

    MONAI's saver removes only the files it wrote itself, so each resume of a killed run would leave
    the checkpoint it resumed from behind. After saving epoch N this saver also removes older
    ``checkpoint_epoch=K.pt`` files (K < N) in ``save_dir``. Arguments are ``CheckpointSaver``'s
    (``epoch_level`` must stay True and ``file_prefix`` empty so the names match ``latest_checkpoint``).
    """

    def interval_completed(self, engine: Any) -> None:
        super().interval_completed(engine)
        regex = re.compile(LAST_CHECKPOINT_PATTERN)
        for path in Path(self.save_dir).iterdir():
            match = regex.match(path.name)
            if match and int(match.group(1)) < engine.state.epoch:
                path.unlink(missing_ok=True)


class EvaluatorBestMetric:
    """The evaluator's best key metric (``state.best_metric`` / ``best_metric_epoch``), kept in the epoch checkpoint
    and put back into the evaluator when a run resumes.

    MONAI's evaluator logs "Got new best metric" whenever a validation beats ``state.best_metric``; a resumed run
    starts from -1, so its first validation was logged as a new best even when worse than the best model the
    restored ``BestModelSaver`` keeps. Saved under ``evaluator_best`` (``LastCheckpointSaver``'s ``save_dict``)
    and, attached to the trainer with a ``load_path``, restored when the trainer starts on every rank.
    A checkpoint written before this entry existed restores nothing (logged).

    Args:
        evaluator: the validation ``Evaluator``.
        load_path: the checkpoint to restore from (None: a fresh run, nothing restored).
        key: the checkpoint entry.
    """

    def __init__(
        self, evaluator: Engine, load_path: Optional[Union[str, os.PathLike]] = None, key: str = "evaluator_best"
    ):
        self.evaluator = evaluator
        self.load_path = load_path
        self.key = key

    def state_dict(self) -> Dict[str, Any]:
        state = self.evaluator.state
        return {"best_metric": float(state.best_metric), "best_metric_epoch": int(state.best_metric_epoch)}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state_dict["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state_dict["best_metric_epoch"])

    def attach(self, engine: Engine) -> None:
        """Restore from ``load_path`` when ``engine`` (the trainer) starts; nothing without a ``load_path``."""
        if self.load_path is not None:
            engine.add_event_handler(Events.STARTED, self.restore)

    def restore(self, engine: Optional[Engine] = None) -> None:
        """Load the best metric saved in ``load_path`` into the evaluator's state."""
        checkpoint = torch.load(self.load_path, map_location="cpu", weights_only=True)
        if self.key not in checkpoint:
            logger.info(
                "%s holds no evaluator best metric (an older checkpoint): best metric not restored", self.load_path
            )
            return
        self.load_state_dict(checkpoint[self.key])
        state = self.evaluator.state
        logger.info(
            "restored best metric %s of epoch %d from %s", state.best_metric, state.best_metric_epoch, self.load_path
        )
