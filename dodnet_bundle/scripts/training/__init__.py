"""Training: the partial-label loss, checkpoints that survive a killed run, and fine-tuning.

Components are named ``scripts.training.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

__getattr__, __dir__, _EXPORTS = lazy_exports(
    __name__, ["losses", "checkpoints", "finetune", "sampling", "validation", "device_augmentation"]
)
__all__ = sorted(_EXPORTS)
