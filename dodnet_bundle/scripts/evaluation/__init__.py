"""Evaluation: per-structure metrics, validation Dice, the labeled-test-set handlers and folder evaluation.

Components are named ``scripts.evaluation.<Name>`` (loaded on first use, see ``scripts.utils.lazy_exports``).
"""

from scripts.utils import lazy_exports

__getattr__, __dir__, _EXPORTS = lazy_exports(__name__, ["metrics", "validation_dice", "handlers", "folders"])
__all__ = sorted(_EXPORTS)
