"""DoDNet: one shared encoder-decoder, a task-conditioned controller and a dynamic head."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from scripts.cli_errors import UsageError
from scripts.utils import as_bool

from .backbone import DoDNetBackbone
from .controller import CONTROLLER_INITS, TaskController
from .dynamic_head import DynamicHead

__all__ = ["DoDNet", "TRAINING_ONLY_PREFIX", "contrast_kernels", "local_contrast"]

TRAINING_ONLY_PREFIX = "backbone.ds_precls."
"""State-dict keys of the deep-supervision modules: optional in a checkpoint, whichever way it is loaded."""


def contrast_kernels(value: Union[Sequence[int], int, str, None]) -> List[int]:
    """``contrast_to_head`` as a list of odd box sizes >= 3 (a list, one int, or "[3, 7]" / "3,7" from a command
    line; None, "" or "[]": none). Raises ``UsageError`` (a ``ValueError``) naming the value otherwise."""
    if value is None:
        return []
    items = value
    if isinstance(value, str):
        items = value.strip().strip("[]()").replace(",", " ").split()
    elif isinstance(value, int):
        items = [value]
    kernels: List[int] = []
    for item in items:
        try:
            kernel = int(item)
        except (TypeError, ValueError):
            kernel = -1
        if kernel < 3 or kernel % 2 == 0 or kernel != float(item):
            raise UsageError(f"contrast_to_head must list odd box sizes >= 3, got {value!r}")
        kernels.append(kernel)
    return kernels


def local_contrast(image: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, C, H, W, D) -> (B, C, H, W, D): each voxel minus the mean of the ``kernel`` x ``kernel`` x ``kernel``
    box around it, counting only the part of the box inside the image (any image size, even one smaller than
    the box); three 1-D box sums, each the difference of two entries of a cumulative sum (cost independent of
    ``kernel``)."""
    pad = kernel // 2
    mean = image
    for axis in range(3):
        dim = 2 + axis
        size = image.shape[dim]
        # the cumulative sum with a leading 0 along dim (F.pad lists the last axis first)
        cumulative = F.pad(mean.cumsum(dim), [0] * (4 - 2 * axis) + [1, 0] + [0] * (2 * axis))
        index = torch.arange(size, device=image.device)
        upper = (index + pad + 1).clamp(max=size)
        lower = (index - pad).clamp(min=0)
        sums = cumulative.index_select(dim, upper) - cumulative.index_select(dim, lower)
        shape = [1, 1, 1, 1, 1]
        shape[dim] = size
        mean = sums / (upper - lower).view(shape).to(sums.dtype)
    return image - mean


class DoDNet(nn.Module):
    """Dynamic on-demand network (Zhang et al., CVPR 2021) in MONAI's (B, C, H, W, D) layout.

    The encoder-decoder runs once per call whatever the number of requested tasks; the controller
    turns the pooled bottleneck features and each task's one-hot code into the weights of a tiny
    dynamic head, and all heads run batched on the shared pre-segmentation map. With default
    arguments the network has the published 17,329,528 parameters.

    Args:
        in_channels: image channels (1).
        num_tasks: number of tasks in the one-hot encoding (7 for MOTS).
        base_channels: width of the first encoder stage (32; tests use tiny widths).
        blocks: residual blocks per encoder stage (``[1, 2, 2, 2, 2]``; the first may be 0, see ``DoDNetBackbone``).
        preseg_channels: channels of the pre-segmentation map, the dynamic head's input (8).
        head_width: hidden width of the dynamic head (4-16; 8).
        head_depth: layers of the dynamic head (2-4; 3).
        weight_std: weight-standardized convolutions in the encoder-decoder (True).
        conditioning: ``"dodnet"`` (image + task), ``"task"`` (task only) or ``"image"`` (Cond-NO).
        norm_groups: GroupNorm groups (16).
        controller_init: ``"default"`` (PyTorch's initialization of the controller, as the authors') or
            ``"task_heads"`` (each task starts from its own He-scaled head, ``TaskController.init_task_heads``).
        image_to_head: the dynamic heads also read the image itself, its channels appended to the pre-segmentation
            map (not in the paper; False). A voxel's own intensity then reaches the 1x1x1 heads directly, which
            lets a narrow network tell small lesions from their organ much sooner (docs/performance.md).
        contrast_to_head: box sizes k (odd, >= 3) of local-contrast channels the dynamic heads also read: for each k
            the image minus its mean over the k x k x k voxels around each voxel (``local_contrast``), per image
            channel and at each head's resolution (not in the paper; none). A 1x1x1 head then sees how much
            darker or brighter a voxel is than its surroundings: the cue of a small lesion in its organ
            (docs/performance.md).
        deep_supervision: decoder levels below full resolution (1/2, 1/4, 1/8: 0-3; 0) whose own pre-segmentation
            maps go through the same generated heads in training mode, for a loss such as MONAI's
            ``DeepSupervisionLoss``. Their modules (``backbone.ds_precls``) are training-only: a checkpoint with
            them loads into a network without, and one without them into a network with them.

    Forward:
        image: (B, in_channels, H, W, D), every spatial size divisible by 16.
        task_id: int64 tensor (B,) (one task per sample), (B, K) (K tasks per sample), or with a
            leading size of 1, (1,) / (1, K), applied to every sample; None requests all tasks.

    Returns:
        logits (B, 2 * K, H, W, D): channel ``2k`` is the organ and ``2k + 1`` the tumor logit of
        the k-th requested task. In training mode with ``deep_supervision`` = n > 0 (eager, not TorchScript): a
        list of n + 1 such logit maps, at full, 1/2, ... 1/2^n resolution.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_tasks: int = 7,
        base_channels: int = 32,
        blocks: Sequence[int] = (1, 2, 2, 2, 2),
        preseg_channels: int = 8,
        head_width: int = 8,
        head_depth: int = 3,
        weight_std: bool = True,
        conditioning: str = "dodnet",
        norm_groups: int = 16,
        controller_init: str = "default",
        image_to_head: Union[bool, str] = False,
        contrast_to_head: Sequence[int] = (),
        deep_supervision: int = 0,
    ) -> None:
        super().__init__()
        if num_tasks < 1:
            raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
        self.in_channels = in_channels
        self.num_tasks = num_tasks
        self.size_divisor = 16
        self.backbone = DoDNetBackbone(
            in_channels, base_channels, blocks, preseg_channels, norm_groups, weight_std, deep_supervision
        )
        self.image_to_head = as_bool(image_to_head)  # "true"/"false" from the command line too
        # a tuple: TorchScript cannot type an empty list attribute, and unrolls the loop over a tuple
        self.contrast_to_head = tuple(contrast_kernels(contrast_to_head))
        image_channels = int(self.image_to_head) + len(self.contrast_to_head)
        head_inputs = preseg_channels + in_channels * image_channels
        self.head = DynamicHead(head_inputs, head_width, head_depth, out_channels=2)
        self.controller = TaskController(num_tasks, self.backbone.feature_channels, self.head.num_params, conditioning)
        if controller_init not in CONTROLLER_INITS:
            raise ValueError(f"controller_init must be one of {CONTROLLER_INITS}, got {controller_init!r}")
        if controller_init == "task_heads":
            self.controller.init_task_heads(self.head.param_fan_in())
        self._register_load_state_dict_pre_hook(self._training_only_keys)

    def _training_only_keys(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        """Deep-supervision modules are training-only: drop a checkpoint's that this network lacks, keep this
        network's own where the checkpoint has none (loading stays strict for every other key)."""
        key = prefix + TRAINING_ONLY_PREFIX
        own = self.backbone.ds_precls.state_dict(prefix=key)
        for name in [k for k in state_dict if k.startswith(key) and k not in own]:
            del state_dict[name]
        for name, value in own.items():
            state_dict.setdefault(name, value)

    def check_image(self, image: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``image`` is (B, in_channels, H, W, D) with sizes divisible by 16."""
        if image.dim() != 5:
            raise ValueError(
                f"image must be 5-D (B, C, H, W, D), got a {image.dim()}-D tensor of shape {list(image.shape)}"
            )
        if image.shape[1] != self.in_channels:
            raise ValueError(
                f"image must have {self.in_channels} channel(s) (B, C, H, W, D), got shape {list(image.shape)}"
            )
        axes = ["H", "W", "D"]
        for axis in range(3):
            size = image.shape[2 + axis]
            if size % self.size_divisor != 0:
                lower = max(self.size_divisor, size // self.size_divisor * self.size_divisor)
                upper = (size // self.size_divisor + 1) * self.size_divisor
                nearest = lower if size - lower < upper - size else upper
                raise ValueError(
                    f"spatial size {list(image.shape[2:])} is not divisible by {self.size_divisor} along axis "
                    f"{axes[axis]} (dim {2 + axis}, size {size}); the nearest valid size is {nearest} "
                    f"(pad or crop to {lower} or {upper})"
                )

    def task_ids(self, task_id: Optional[torch.Tensor], batch: int, device: torch.device) -> torch.Tensor:
        """Validate ``task_id`` and broadcast it to an int64 (batch, K) tensor on ``device``."""
        if task_id is None:
            return torch.arange(self.num_tasks, device=device).unsqueeze(0).expand(batch, self.num_tasks)
        if task_id.is_floating_point() or task_id.is_complex() or task_id.dtype == torch.bool:
            raise ValueError(f"task_id must be an integer tensor, got dtype {task_id.dtype}")
        if task_id.dim() == 0:
            task_id = task_id.reshape(1)
        if task_id.dim() == 1:
            task_id = task_id.unsqueeze(1)
        if task_id.dim() != 2:
            raise ValueError(f"task_id must have shape (B,) or (B, K), got {list(task_id.shape)}")
        if task_id.shape[1] == 0:
            raise ValueError("task_id requests no task (K = 0)")
        if task_id.shape[0] != batch:
            if task_id.shape[0] != 1:
                raise ValueError(
                    f"task_id has {task_id.shape[0]} rows but the image batch has {batch} samples; "
                    "pass (B,) or (B, K), or (1,) or (1, K) to apply the same tasks to every sample"
                )
            task_id = task_id.expand(batch, task_id.shape[1])
        # the range check reads the ids on the host: left out of torch.compile graphs (it would split them);
        # the inferer's task selection validates ids before any compiled forward
        if torch.jit.is_scripting() or not torch.compiler.is_compiling():
            low, high = int(task_id.min()), int(task_id.max())
            if low < 0 or high >= self.num_tasks:
                bad = low if low < 0 else high
                raise ValueError(f"task id {bad} is out of range: valid ids are 0..{self.num_tasks - 1}")
        return task_id.to(device=device, dtype=torch.long)

    def forward(self, image: torch.Tensor, task_id: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not torch.jit.is_scripting():
            # a MetaTensor (MONAI's data pipeline) would carry its metadata through every layer: 25% of a
            # CPU training step, and relu/copy kernels lose the channels-last layout; the output is plain
            image = image.as_subclass(torch.Tensor)
        self.check_image(image)
        tasks = self.task_ids(task_id, image.shape[0], image.device)
        if not torch.jit.is_scripting() and self.training and self.backbone.deep_supervision:
            return self._forward_deep_supervision(image, tasks)  # type: ignore[return-value]
        preseg, pooled = self.backbone(image)
        params = self.controller(pooled, tasks)
        return self.head(self.head_input(preseg, image), params)

    def head_input(self, preseg: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """The heads' input: the pre-segmentation map (B, P, h, w, d), followed by the image average-pooled to
        (h, w, d) with ``image_to_head`` and by its local contrast for each ``contrast_to_head`` box size
        -> (B, P + in_channels * (image_to_head + len(contrast_to_head)), h, w, d)."""
        if not self.image_to_head and len(self.contrast_to_head) == 0:
            return preseg
        if image.shape[2:] != preseg.shape[2:]:
            image = F.adaptive_avg_pool3d(image, preseg.shape[2:])
        inputs = [preseg, image.to(preseg.dtype)] if self.image_to_head else [preseg]
        image = image.float()  # the contrast in float32: box sums of a bf16 image would lose it
        for kernel in self.contrast_to_head:
            inputs.append(local_contrast(image, kernel).to(preseg.dtype))
        return torch.cat(inputs, dim=1)

    @torch.jit.unused
    def _forward_deep_supervision(self, image: torch.Tensor, tasks: torch.Tensor) -> List[torch.Tensor]:
        """[logits at full resolution, at 1/2, ...]: every level through the same generated heads."""
        preseg, pooled, levels = self.backbone.forward_levels(image)
        params = self.controller(pooled, tasks)
        return [self.head(self.head_input(m, image), params) for m in [preseg] + levels]
