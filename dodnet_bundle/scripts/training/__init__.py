"""Training: the partial-label loss, checkpoints that survive a killed run, and fine-tuning.

Components are named ``scripts.training.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

_EXPORTS = {
    "PartialLabelDiceBCELoss": "losses",
    "LAST_CHECKPOINT_PATTERN": "checkpoints",
    "latest_checkpoint": "checkpoints",
    "BestModelSaver": "checkpoints",
    "LastCheckpointSaver": "checkpoints",
    "EvaluatorBestMetric": "checkpoints",
    "controller_task_columns": "finetune",
    "expand_task_checkpoint": "finetune",
    "load_pretrained_dodnet": "finetune",
    "new_task_spec": "finetune",
    "NewTaskLabelsd": "finetune",
    "load_new_task_datalist": "finetune",
    "load_backbone_weights": "finetune",
    "SAMPLING_MODES": "sampling",
    "TaskSampler": "sampling",
    "task_weights": "sampling",
    "AutocastSlidingWindowInferer": "validation",
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
