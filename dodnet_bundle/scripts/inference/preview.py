"""PNG preview of a segmentation: axial and coronal slices through the largest structure, with a legend."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from scripts.tasks import merged_label_colors, merged_label_names

__all__ = ["preview_slices", "render_preview"]


def preview_slices(labels: np.ndarray) -> Tuple[int, int]:
    """Axial (k) and coronal (j) indices through the largest structure of a (H, W, D) RAS label map.

    The slices are those where the largest structure (most voxels) has its largest cross-section;
    the middle slices when the map is empty.
    """
    counts = np.bincount(labels.reshape(-1).astype(np.int64))
    counts[0] = 0
    if counts.sum() == 0:
        return labels.shape[2] // 2, labels.shape[1] // 2
    mask = labels == int(np.argmax(counts))
    return int(np.argmax(mask.sum(axis=(0, 1)))), int(np.argmax(mask.sum(axis=(0, 2))))


def _radiological(plane: np.ndarray) -> np.ndarray:
    """A (first axis, second axis) RAS slice as display rows/columns: patient right on the left, top = A or S."""
    return plane.T[::-1, ::-1]


def render_preview(
    image: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    alpha: float = 0.45,
    volumes_ml: Dict[int, float] | None = None,
) -> Image.Image:
    """Render an axial and a coronal slice side by side with a coloured label overlay and a legend.

    Args:
        image: (H, W, D) CT in RAS orientation (any intensity scale; shown min-max windowed).
        labels: (H, W, D) merged label map on the same grid.
        spacing: voxel spacing (H, W, D) in mm, for the coronal aspect ratio.
        alpha: overlay opacity.
        volumes_ml: optional ``{label id: volume}`` shown in the legend.

    Returns:
        an RGB ``PIL.Image``.
    """
    if image.shape != labels.shape or image.ndim != 3:
        raise ValueError(f"image {image.shape} and labels {labels.shape} must be the same (H, W, D) shape")
    k, j = preview_slices(labels)
    low, high = float(np.min(image)), float(np.max(image))
    colors = merged_label_colors()
    lut = np.zeros((256, 3), dtype=np.float32)
    for mid, rgb in colors.items():
        lut[mid] = rgb

    def panel(img2d: np.ndarray, lab2d: np.ndarray, aspect: float) -> Image.Image:
        gray = np.clip((img2d - low) / max(high - low, 1e-6), 0, 1)[..., None] * 255.0 * np.ones(3)
        overlay = lut[lab2d.astype(np.int64)]
        fg = (lab2d > 0)[..., None]
        rgb = np.where(fg, (1 - alpha) * gray + alpha * overlay, gray).astype(np.uint8)
        pil = Image.fromarray(np.ascontiguousarray(rgb))
        height = max(1, int(round(pil.height * aspect)))
        return pil.resize((pil.width, height), Image.NEAREST)

    sx, sy, sz = (float(s) for s in spacing)
    axial = panel(_radiological(image[:, :, k]), _radiological(labels[:, :, k]), sy / sx)
    coronal = panel(_radiological(image[:, j, :]), _radiological(labels[:, j, :]), sz / sx)
    present = [int(m) for m in np.unique(labels) if m > 0]
    names = merged_label_names()
    line = 14
    legend_h = line * (len(present) + 2)
    width = axial.width + coronal.width + 10
    canvas = Image.new("RGB", (width, max(axial.height, coronal.height) + legend_h), (0, 0, 0))
    canvas.paste(axial, (0, 0))
    canvas.paste(coronal, (axial.width + 10, 0))
    draw = ImageDraw.Draw(canvas)
    y = max(axial.height, coronal.height) + 4
    draw.text((4, y), f"axial slice {k}, coronal slice {j}", fill=(255, 255, 255))
    for mid in present or [0]:
        y += line
        if mid == 0:
            draw.text((4, y), "no structure found", fill=(255, 255, 255))
            break
        draw.rectangle([4, y + 2, 14, y + 11], fill=tuple(colors.get(mid, (255, 255, 255))))
        text = f"{mid} {names.get(mid, '?')}"
        if volumes_ml and mid in volumes_ml:
            text += f": {volumes_ml[mid]:.1f} mL"
        draw.text((20, y), text, fill=(255, 255, 255))
    return canvas
