"""DoDNet network components, usable by ``_target_`` in bundle configs (``scripts.networks.DoDNet``)."""

from .backbone import DoDNetBackbone, stage_blocks
from .blocks import PreActResBlock
from .controller import CONDITIONING_MODES, CONTROLLER_INITS, TaskController
from .dodnet import DoDNet, contrast_kernels, local_contrast
from .dynamic_head import DynamicHead
from .segmenter import DoDNetSegmenter
from .ws_conv import WSConv3d, standardize_weight

__all__ = [
    "CONDITIONING_MODES",
    "CONTROLLER_INITS",
    "DoDNet",
    "DoDNetBackbone",
    "DoDNetSegmenter",
    "DynamicHead",
    "PreActResBlock",
    "TaskController",
    "WSConv3d",
    "contrast_kernels",
    "local_contrast",
    "stage_blocks",
    "standardize_weight",
]
