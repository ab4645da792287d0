"""Connected components on the mask's device: the torch labelling against scikit-image, and the post-processing
with each backend (scripts.inference.components)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from skimage import measure

from scripts.inference.components import (
    keep_largest,
    label_components,
    label_components_torch,
    remove_up_to,
    resolve_backend,
)
from scripts.inference.postprocessing import TaskPostProcessd, apply_post_rule
from scripts.tasks import TASKS, PostRule


def _blobs(seed: int, shape=(23, 19, 11), density: float = 0.35) -> torch.Tensor:
    """Random binary mask with many components of varied shapes (thin bridges, single voxels, border contact)."""
    rng = np.random.default_rng(seed)
    return torch.as_tensor(rng.random(shape) < density)


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torch_labelling_equals_scikit_image(connectivity, seed):
    mask = _blobs(seed, density={1: 0.35, 2: 0.18, 3: 0.12}[connectivity])  # below percolation: many components
    labels, count = label_components_torch(mask, connectivity)
    expected, expected_count = measure.label(mask.numpy(), connectivity=connectivity, return_num=True)
    assert count == expected_count > 5
    np.testing.assert_array_equal(labels.numpy(), expected)


def test_torch_labelling_of_empty_and_full_masks_and_a_long_path():
    empty = torch.zeros(5, 6, 7, dtype=torch.bool)
    labels, count = label_components_torch(empty)
    assert count == 0 and not labels.any()
    full = torch.ones(5, 6, 7, dtype=torch.bool)
    labels, count = label_components_torch(full)
    assert count == 1 and bool((labels == 1).all())
    snake = torch.zeros(9, 9, 1, dtype=torch.bool)  # a serpentine one voxel wide: many propagation rounds
    snake[0::2, :, 0] = True
    for row in range(1, 9, 2):
        snake[row, 8 if row % 4 == 1 else 0, 0] = True
    labels, count = label_components_torch(snake, connectivity=1)
    assert count == 1 and int(labels.max()) == 1


def test_backend_names_and_auto_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "skimage"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="components backend 'gpu'"):
        resolve_backend("gpu", torch.device("cpu"))
    with pytest.raises(ValueError, match="components backend"):
        TaskPostProcessd(keys="pred", backend="gpu")  # at construction, before any case


@pytest.mark.parametrize("seed", [3, 4])
def test_keep_largest_and_remove_up_to_agree_across_backends(seed):
    mask = _blobs(seed, density=0.12)[None].to(torch.uint8)
    for n in (1, 3):
        torch_kept = keep_largest(mask.clone(), n, backend="torch")
        monai_kept = keep_largest(mask.clone(), n, backend="skimage")  # MONAI's transform may write in place
        np.testing.assert_array_equal(torch_kept.numpy(), monai_kept.numpy())
        assert torch_kept.dtype == mask.dtype and int(torch_kept.sum()) < int(mask.sum())
    for max_voxels in (1, 4, 20):
        np.testing.assert_array_equal(
            remove_up_to(mask.clone(), max_voxels, backend="torch").numpy(),
            remove_up_to(mask.clone(), max_voxels).numpy(),
        )
    labels, _ = label_components(mask[0].bool())
    sizes = np.bincount(labels.numpy().reshape(-1))[1:]
    kept = remove_up_to(mask, 4)
    assert int(kept.sum()) == int(sizes[sizes > 4].sum())


def test_every_published_rule_gives_the_same_masks_with_the_torch_labelling():
    rules = {spec.post for spec in TASKS} | {PostRule(1, True, 5, 2)}
    for i, rule in enumerate(sorted(rules, key=dataclasses.astuple)):
        organ = _blobs(10 + i, density=0.45)[None].float()
        tumor = _blobs(20 + i, density=0.2)[None].float()
        reference = apply_post_rule(organ.clone(), tumor.clone(), rule, backend="skimage")
        on_torch = apply_post_rule(organ.clone(), tumor.clone(), rule, backend="torch")
        for a, b in zip(reference, on_torch):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=str(rule))
