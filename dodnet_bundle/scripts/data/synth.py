"""MOTS-synth: small synthetic, partially labeled CT volumes, the bundle's embedded default data set.

Every volume is a miniature abdominal phantom that contains ALL seven structure kinds of MOTS: the
liver with tumors and hepatic vessels, two kidneys with a tumor, the pancreas with a tumor, the colon
with a tumor, the lungs with a nodule and the spleen (plus distractors: body wall, fat, spine, aorta).
Each volume's label, however, marks only its own task's organ and tumor, written in that task's
source label convention (``scripts.tasks.TASKS``: e.g. colon labels only its tumor as 1, spleen only
its organ as 1, hepatic vessel labels vessels 1 and tumors 2). As in the real MOTS collection, a
network that does not know the task sees the same structure as foreground in one volume and as
background in another and cannot fit the labels; DoDNet's task prior resolves it.

Geometry: the phantom is defined in millimetres and sampled on an anisotropic grid (in-plane
spacing 0.7-0.9 mm, slice spacing 1.5-2.5 mm), stored as NIfTI (int16 HU images, uint8 labels) with
a proper affine, in RAS or LPS storage order. The default field of view (50.4 x 50.4 x 46.5 mm)
becomes at most 64 x 64 x 32 voxels after the bundle's resampling to 0.8 x 0.8 x 1.5 mm, so a
reduced-width DoDNet trains on it in minutes on a laptop CPU. Intensities
are plausible contrast-enhanced CT values: air -1000, lung about -800, fat about -100, soft tissue
30-60, liver about 100, pancreas about 70, spleen about 140, kidney cortex about 200, enhanced
vessels 180-250, bone 250-800; tumors are hypo- or hyper-dense; organ shapes, sizes, positions and
textures are random and Gaussian noise is added.

``size="realistic"`` (``generate_case``, ``ensure_mots_synth`` and so ``train.json``'s ``synth_options``) puts the
same phantoms on MOTS-sized grids instead: 512 x 512 in-plane at 0.6-1.0 mm, 40-900 slices at 0.7-5 mm, for
benchmarking preprocessing, disk and loaders at real CT sizes (the detail stays that of the miniature phantom).

``ensure_mots_synth`` generates a data set once into a cache folder and returns its datalist.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
from scipy import ndimage

from scripts.tasks import TASKS, LabelRule, TaskSpec, resolve_task
from scripts.utils import atomic_output, write_json_atomic

__all__ = [
    "SYNTH_VERSION",
    "STRUCTURES",
    "TASK_STRUCTURES",
    "Phantom",
    "make_phantom",
    "encode_task_label",
    "task_masks",
    "SPLITS",
    "case_rng",
    "SynthCase",
    "SIZE_MODES",
    "generate_case",
    "ensure_mots_synth",
]

SYNTH_VERSION = 2
"""Bumped whenever the generator's output changes, so stale caches are regenerated."""

STRUCTURES: Tuple[str, ...] = (
    "liver",
    "liver_tumor",
    "hepatic_vessel",
    "kidney",
    "kidney_tumor",
    "pancreas",
    "pancreas_tumor",
    "colon",
    "colon_tumor",
    "lung",
    "lung_tumor",
    "spleen",
)
"""Phantom structures (each volume contains all of them); index + 1 is the id in ``Phantom.structures``."""

TASK_STRUCTURES: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "liver": (("liver", "liver_tumor", "hepatic_vessel"), ("liver_tumor",)),
    "kidney": (("kidney", "kidney_tumor"), ("kidney_tumor",)),
    "hepatic_vessel": (("hepatic_vessel",), ("liver_tumor",)),
    "pancreas": (("pancreas", "pancreas_tumor"), ("pancreas_tumor",)),
    "colon": (("colon", "colon_tumor"), ("colon_tumor",)),
    "lung": (("lung", "lung_tumor"), ("lung_tumor",)),
    "spleen": (("spleen",), ()),
}
"""Which phantom structures form each task's (organ, tumor) masks, as the real sources annotate them
(LiTS counts vessels and tumors inside the liver as liver; MSD Task08's tumors are liver tumors).
Whether a task labels the organ and/or the tumor, and with which values, comes from ``TASKS``."""

DEFAULT_FOV_MM = (50.4, 50.4, 46.5)


# ----------------------------------------------------------------------------------------------
# phantom geometry (all coordinates in mm, RAS patient frame centred on the body, see ``_grid``)
# ----------------------------------------------------------------------------------------------


class Phantom:
    """One sampled phantom: the CT image and the exclusive structure map on the same voxel grid.

    Attributes:
        image: (X, Y, Z) float32 HU values.
        structures: (X, Y, Z) uint8, 0 = none, ``i + 1`` = ``STRUCTURES[i]`` (later structures win).
        spacing: voxel size in mm along X, Y, Z.
    """

    def __init__(self, image: np.ndarray, structures: np.ndarray, spacing: Sequence[float]) -> None:
        self.image = image
        self.structures = structures
        self.spacing = tuple(float(s) for s in spacing)

    def mask(self, names: Sequence[str]) -> np.ndarray:
        """Boolean (X, Y, Z) union of the named structures."""
        ids = [STRUCTURES.index(n) + 1 for n in names]
        return np.isin(self.structures, ids)


def _rotation_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Zero-mean, unit-std smooth random field (Gaussian-filtered white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=sigma_vox, mode="wrap")
    return (field - field.mean()) / (field.std() + 1e-6)


def _ellipsoid(
    pts: np.ndarray, center: Sequence[float], radii: Sequence[float], angle: float, bumps: np.ndarray, amp: float
) -> np.ndarray:
    """Boolean mask of a rotated ellipsoid whose surface is perturbed by the smooth field ``bumps``."""
    local = (pts - np.asarray(center)) @ _rotation_z(angle)
    q = np.sum((local / np.asarray(radii)) ** 2, axis=-1)
    return q < 1.0 + amp * bumps


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((pts - a) @ ab) / max(float(ab @ ab), 1e-9), 0.0, 1.0)
    return np.linalg.norm(pts - (a + t[..., None] * ab), axis=-1)


def _box(pts: np.ndarray, low: Sequence[float], high: Sequence[float]) -> Tuple[slice, slice, slice]:
    """Index slices of the grid ``pts`` (``_grid``) covering the mm box [low, high], plus one voxel each side.

    Shapes are drawn only inside their box: the voxels there get the same values as on the whole grid,
    and every voxel outside lies beyond the shape, so the masks are the same at a fraction of the work.
    """
    slices = []
    for axis in range(3):
        coords = pts[(0,) * axis + (slice(None),) + (0,) * (2 - axis) + (axis,)]  # increasing mm along the axis
        start = max(int(np.searchsorted(coords, low[axis], side="left")) - 1, 0)
        stop = min(int(np.searchsorted(coords, high[axis], side="right")) + 1, len(coords))
        slices.append(slice(start, max(start, stop)))
    return slices[0], slices[1], slices[2]


def _ball(pts: np.ndarray, center: np.ndarray, radius: float) -> np.ndarray:
    """Boolean mask of the voxels closer than ``radius`` mm to ``center``."""
    center = np.asarray(center)
    box = _box(pts, center - radius, center + radius)
    mask = np.zeros(pts.shape[:-1], dtype=bool)
    mask[box] = np.linalg.norm(pts[box] - center, axis=-1) < radius
    return mask


def _tube(pts: np.ndarray, path: Sequence[np.ndarray], radius: Union[float, Sequence[float]]) -> np.ndarray:
    """Boolean mask of voxels within ``radius`` (per segment or one value) of a polyline."""
    radii = [radius] * (len(path) - 1) if np.isscalar(radius) else list(radius)
    mask = np.zeros(pts.shape[:-1], dtype=bool)
    for a, b, r in zip(path[:-1], path[1:], radii):
        a, b = np.asarray(a), np.asarray(b)
        box = _box(pts, np.minimum(a, b) - r, np.maximum(a, b) + r)
        mask[box] |= _segment_distance(pts[box], a, b) < r
    return mask


def _grid(shape: Sequence[int], spacing: Sequence[float], center_offset: Sequence[float]) -> np.ndarray:
    """(X, Y, Z, 3) mm coordinates of voxel centres in the phantom frame.

    The phantom frame is RAS (+x towards the patient's right, +y anterior, +z superior) with its
    origin at the body centre, which lies ``center_offset`` mm from the centre of the field of view.
    """
    axes = [(np.arange(n) - (n - 1) / 2.0) * s - o for n, s, o in zip(shape, spacing, center_offset)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).astype(np.float32)


class _Painter:
    """Paints structures into the image and the exclusive structure map, in order (later wins)."""

    def __init__(self, shape: Tuple[int, ...], rng: np.random.Generator, texture: np.ndarray) -> None:
        self.image = np.full(shape, -1000.0, dtype=np.float32)
        self.structures = np.zeros(shape, dtype=np.uint8)
        self.rng = rng
        self.texture = texture

    def paint(self, mask: np.ndarray, hu: float, structure: Optional[str] = None, texture_hu: float = 0.0) -> None:
        value = np.float32(hu) + np.float32(texture_hu) * self.texture[mask]
        self.image[mask] = value
        self.structures[mask] = 0 if structure is None else STRUCTURES.index(structure) + 1

    def region(self, name: str) -> np.ndarray:
        return self.structures == STRUCTURES.index(name) + 1

    def free(self, *names: str) -> np.ndarray:
        """Voxels of no labeled structure or of one of ``names`` (where a tumor may grow)."""
        return np.isin(self.structures, [0] + [STRUCTURES.index(n) + 1 for n in names])


def _pick_inside(rng: np.random.Generator, pts: np.ndarray, mask: np.ndarray, margin_mm: float, spacing) -> np.ndarray:
    """A random point (mm) of ``mask`` at least ``margin_mm`` from its boundary (or its deepest point)."""
    box: Tuple[slice, ...] = (slice(None),) * 3
    if mask.any():  # the mask's bounding box and a shell of background: the same depths, less work
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in ndimage.find_objects(mask.astype(np.uint8))[0])
    depth = ndimage.distance_transform_edt(mask[box], sampling=spacing)
    origin = np.array([s.start or 0 for s in box])
    candidates = np.argwhere(depth >= margin_mm) + origin
    if len(candidates) == 0:
        candidates = (
            np.argwhere(depth >= 0.5 * depth.max()) + origin if depth.max() > 0 else np.argwhere(np.ones_like(mask))
        )
    idx = tuple(candidates[rng.integers(len(candidates))])
    return pts[idx].astype(np.float64)


def make_phantom(
    rng: np.random.Generator,
    spacing: Sequence[float] = (0.8, 0.8, 1.5),
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    noise_hu: Optional[float] = None,
) -> Phantom:
    """Sample one miniature abdominal phantom containing every structure of ``STRUCTURES``.

    Args:
        rng: the random generator (the only source of randomness: same state, same phantom).
        spacing: voxel size in mm along x (right), y (anterior), z (superior).
        fov_mm: field of view in mm; the grid has ``round(fov / spacing)`` voxels per axis.
        noise_hu: standard deviation of the Gaussian noise (random in 5-12 HU when None).

    Returns:
        a ``Phantom`` with an (X, Y, Z) float32 HU image and its structure map.
    """
    spacing = tuple(float(s) for s in spacing)
    shape = tuple(max(16, int(round(f / s))) for f, s in zip(fov_mm, spacing))
    offset = rng.uniform(-1.5, 1.5, size=3)
    pts = _grid(shape, spacing, offset)
    scale = rng.uniform(0.92, 1.08)
    sigma_vox = [3.0 / s for s in spacing]
    bumps = _smooth_field(rng, shape, sigma_vox)
    texture = _smooth_field(rng, shape, [1.2 / s for s in spacing])
    painter = _Painter(shape, rng, texture)
    u = rng.uniform

    def jitter(point: Sequence[float], mm: float = 1.5) -> np.ndarray:
        return scale * np.asarray(point, dtype=np.float64) + rng.uniform(-mm, mm, size=3)

    # body: air outside, subcutaneous fat, muscle wall, visceral fat with soft-tissue streaks
    ax, ay = scale * u(21.0, 23.5), scale * u(16.0, 18.5)
    ellipse = (pts[..., 0] / ax) ** 2 + (pts[..., 1] / ay) ** 2
    body = ellipse < 1.0
    inner = (pts[..., 0] / (ax - 2.5)) ** 2 + (pts[..., 1] / (ay - 2.5)) ** 2 < 1.0
    cavity = (pts[..., 0] / (ax - 4.0)) ** 2 + (pts[..., 1] / (ay - 4.0)) ** 2 < 1.0
    painter.paint(body, u(-110, -90), texture_hu=10)
    painter.paint(inner, u(40, 60), texture_hu=8)
    painter.paint(cavity, u(-90, -70), texture_hu=25)

    # distractors: vertebral body (bone), aorta and vena cava (contrast-enhanced)
    spine_c = jitter((0.0, -ay / scale + 5.5, 0.0), 0.5)
    spine = _tube(pts, [spine_c + [0, 0, -40], spine_c + [0, 0, 40]], 3.6 * scale)
    painter.paint(spine, u(650, 800))
    painter.paint(_tube(pts, [spine_c + [0, 0, -40], spine_c + [0, 0, 40]], 2.8 * scale), u(250, 350), texture_hu=40)
    aorta_c = spine_c + [-2.0, 5.5, 0.0] + u(-0.5, 0.5, size=3)
    painter.paint(_tube(pts, [aorta_c + [0, 0, -40], aorta_c + [0, 0, 40]], 1.9 * scale), u(180, 220))
    ivc_c = spine_c + [3.5, 5.0, 0.0] + u(-0.5, 0.5, size=3)
    painter.paint(_tube(pts, [ivc_c + [0, 0, -40], ivc_c + [0, 0, 40]], 2.0 * scale), u(130, 160))

    # lungs (superior): air-filled, the liver dome is painted over their bases later
    lung_z = 24.0 + u(-2.0, 2.0)
    lungs = np.zeros(shape, dtype=bool)
    for side in (1.0, -1.0):
        radii = scale * np.array([8.0, 11.0, 10.0]) * u(0.9, 1.1, size=3)
        lungs |= _ellipsoid(pts, jitter((side * 10.0, -2.0, lung_z)), radii, u(-0.2, 0.2), bumps, 0.1)
    painter.paint(lungs & inner, u(-850, -780), "lung", texture_hu=25)

    # colon: a U-shaped tube in the lower abdomen with a gas or fluid lumen
    frame = [(15, -3, -25), (15, -1, -13), (6, 9, -11), (-6, 9, -11), (-15, -1, -13), (-15, -3, -25)]
    colon_path = [jitter(p) for p in frame]
    colon_r = scale * u(3.4, 4.2)
    colon = _tube(pts, colon_path, colon_r) & cavity
    lumen = _tube(pts, colon_path, colon_r - 1.3 * scale) & cavity
    painter.paint(colon, u(35, 55), "colon", texture_hu=6)
    painter.paint(lumen & painter.region("colon"), u(-950, -850) if u() < 0.6 else u(0, 25), "colon", texture_hu=30)

    # kidneys (posterior, both sides): enhanced cortex, darker medulla; one tumor, may be exophytic
    kidneys = []
    kz = u(-10.0, -4.0)
    for side in (1.0, -1.0):
        center = jitter((side * 8.5, -ay / scale + 8.0, kz))
        radii = scale * np.array([4.6, 6.0, 8.5]) * u(0.9, 1.1, size=3)
        angle = side * u(0.1, 0.4)
        kidneys.append((center, radii, angle))
        painter.paint(_ellipsoid(pts, center, radii, angle, bumps, 0.08) & cavity, u(185, 210), "kidney", texture_hu=6)
        painter.paint(_ellipsoid(pts, center, 0.55 * radii, angle, bumps, 0.08) & cavity, u(135, 155), "kidney")
    # spleen (left, posterior-lateral)
    spleen = _ellipsoid(
        pts,
        jitter((-14.0, -4.5, u(2.0, 7.0))),
        scale * np.array([5.0, 8.0, 7.5]) * u(0.9, 1.1, size=3),
        u(0.3, 0.8),
        bumps,
        0.12,
    )
    painter.paint(spleen & cavity, u(135, 150), "spleen", texture_hu=5)

    # liver (right, superior): large, moderately enhanced; hepatic vessel tree and tumors inside
    liver_c = jitter((9.0, 1.0, u(4.0, 8.0)))
    liver_radii = scale * np.array([11.0, 12.0, 8.0]) * u(0.9, 1.1, size=3)
    liver = _ellipsoid(pts, liver_c, liver_radii, u(-0.2, 0.2), bumps, 0.15) & cavity
    painter.paint(liver, u(95, 110), "liver", texture_hu=5)
    liver = painter.region("liver")
    hilum = liver_c + scale * np.array([-4.0, -2.0, -2.0])
    vessels = np.zeros(shape, dtype=bool)
    for _ in range(rng.integers(3, 5)):
        target = _pick_inside(rng, pts, liver, 2.0, spacing)
        middle = 0.5 * (hilum + target) + rng.uniform(-2.0, 2.0, size=3)
        r0 = scale * u(2.4, 3.0)
        vessels |= _tube(pts, [hilum, middle, target], [r0, 0.85 * r0])
    painter.paint(vessels & liver, u(220, 250), "hepatic_vessel")
    for _ in range(rng.integers(1, 4)):
        c = _pick_inside(rng, pts, liver, 3.0, spacing)
        hu = u(30, 55) if u() < 0.7 else u(160, 175)
        region = painter.region("liver") | painter.region("hepatic_vessel")
        painter.paint(_ball(pts, c, scale * u(2.0, 4.0)) & region, hu, "liver_tumor", 10)

    # pancreas: a lobulated curved tube from the splenic hilum to the head, with a hypodense tumor
    pz = u(-5.0, -2.0)
    pancreas_path = [jitter(p, 1.0) for p in ((-10.0, -1.0, pz + 1.0), (0.0, 3.0, pz), (4.0, 2.0, pz - 2.0))]
    pancreas_r = scale * u(3.0, 3.6)
    pancreas = np.zeros(shape, dtype=bool)
    for a, b in zip(pancreas_path[:-1], pancreas_path[1:]):
        pancreas |= _segment_distance(pts, a, b) < pancreas_r * (1.0 + 0.18 * bumps)
    painter.paint(pancreas & cavity & painter.free(), u(60, 75), "pancreas", texture_hu=8)
    t = u(0.2, 0.8)
    seg = rng.integers(2)
    tumor_c = pancreas_path[seg] + t * (pancreas_path[seg + 1] - pancreas_path[seg])
    pancreas_tumor = _ball(pts, tumor_c, scale * u(2.2, 3.0)) & cavity
    painter.paint(pancreas_tumor & painter.free("pancreas"), u(10, 30), "pancreas_tumor", texture_hu=6)

    # kidney tumor at the surface of one kidney (may be exophytic)
    center, radii, angle = kidneys[rng.integers(2)]
    theta = u(0.0, 2.0 * np.pi)
    direction = _rotation_z(angle) @ np.array([np.cos(theta), np.sin(theta), u(-0.3, 0.3)])
    tumor_c = center + 0.6 * np.abs(radii).min() * direction / np.linalg.norm(direction)
    kidney_tumor = _ball(pts, tumor_c, scale * u(2.8, 4.0)) & cavity
    painter.paint(kidney_tumor & painter.free("kidney"), u(55, 90), "kidney_tumor", texture_hu=15)

    # colon tumor: an annular mass filling a stretch of the colon
    seg = rng.integers(1, len(colon_path) - 2)
    tumor_c = colon_path[seg] + u(0.2, 0.8) * (colon_path[seg + 1] - colon_path[seg])
    colon_tumor = _ball(pts, tumor_c, scale * u(3.0, 4.5)) & _tube(pts, colon_path, colon_r + 0.6)
    painter.paint(colon_tumor & cavity & painter.free("colon"), u(45, 70), "colon_tumor", texture_hu=10)

    # lung nodule, inside one lung
    lung = painter.region("lung")
    c = _pick_inside(rng, pts, lung, 3.0, spacing)
    painter.paint(_ball(pts, c, scale * u(2.0, 3.8)) & lung, u(20, 50), "lung_tumor", 10)

    # partial-volume blur and scanner noise
    image = ndimage.gaussian_filter(painter.image, sigma=[0.45 / s for s in spacing])
    sigma = u(5.0, 12.0) if noise_hu is None else float(noise_hu)
    image = image + sigma * rng.standard_normal(shape).astype(np.float32)
    return Phantom(image.astype(np.float32), painter.structures, spacing)


# ----------------------------------------------------------------------------------------------
# labels in each source's convention
# ----------------------------------------------------------------------------------------------


def _rule_hits(rule: Optional[LabelRule], value: int) -> Optional[bool]:
    if rule is None:
        return None
    return bool(rule.matches(value))


def encode_task_label(spec: TaskSpec, organ: np.ndarray, tumor: np.ndarray) -> np.ndarray:
    """Write (organ, tumor) masks as ``spec``'s source label values (the inverse of its label rules).

    Each voxel gets the source value whose rules reproduce the voxel's labeled channels (a channel the
    source does not label is ignored); where no value reproduces both, the tumor decides (e.g. a
    hepatic-vessel voxel inside a tumor is written as tumor).

    Args:
        spec: the task (``TASKS`` entry).
        organ: boolean (X, Y, Z) organ mask in that task's sense.
        tumor: boolean (X, Y, Z) tumor mask.

    Returns:
        uint8 (X, Y, Z) label map with values from ``spec.source_values``.
    """
    label = np.zeros(organ.shape, dtype=np.uint8)
    if 0 not in spec.source_values:
        raise ValueError(f"task {spec.name}: source_values {spec.source_values} lack the background value 0")
    assigned = np.zeros(organ.shape, dtype=bool)
    wanted = []
    for o in (True, False):
        for t in (True, False):
            wanted.append((o, t))
    for o, t in wanted:
        need_o = o if spec.organ_rule is not None else None
        need_t = t if spec.tumor_rule is not None else None
        region = (organ if o else ~organ) & (tumor if t else ~tumor) & ~assigned
        if not region.any():
            continue
        exact = [
            v
            for v in spec.source_values
            if (_rule_hits(spec.organ_rule, v), _rule_hits(spec.tumor_rule, v)) == (need_o, need_t)
        ]
        if not exact:
            exact = [v for v in spec.source_values if _rule_hits(spec.tumor_rule, v) == need_t]
        if not exact:
            raise ValueError(f"task {spec.name}: no source value encodes organ={o}, tumor={t}")
        label[region] = exact[0]
        assigned |= region
    return label


def task_masks(phantom: Phantom, spec: TaskSpec) -> Tuple[np.ndarray, np.ndarray]:
    """The (organ, tumor) boolean masks the task's source would annotate in ``phantom``."""
    organ_names, tumor_names = TASK_STRUCTURES[spec.name]
    return phantom.mask(organ_names), phantom.mask(tumor_names)


# ----------------------------------------------------------------------------------------------
# cases, files and the cached data set
# ----------------------------------------------------------------------------------------------

SPLITS: Tuple[str, ...] = ("training", "validation", "test")


def case_rng(seed: int, task_id: int, split: str, index: int) -> np.random.Generator:
    """The random generator of one case: depends only on (seed, task, split, index), so growing a split
    or changing another split's size leaves existing cases unchanged."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(task_id), SPLITS.index(split), int(index)]))


class SynthCase(NamedTuple):
    """One generated case (arrays in storage order, sharing ``affine``)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    structures: np.ndarray


SIZE_MODES: Tuple[str, ...] = ("demo", "realistic")
"""``demo``: miniature volumes (at most 64 x 64 x 32 voxels after resampling); ``realistic``: MOTS-sized grids."""

DEFAULT_MAX_SLICES = 900


def _demo_case(spec: TaskSpec, rng: np.random.Generator, fov_mm: Sequence[float]) -> SynthCase:
    """A miniature case: ``fov_mm`` sampled at 0.7-0.9 mm in-plane and 1.5-2.5 mm between slices."""
    spacing = (rng.uniform(0.7, 0.9),) * 2 + (rng.uniform(1.5, 2.5),)
    for _ in range(20):
        phantom = make_phantom(rng, spacing, fov_mm)
        present = np.bincount(phantom.structures.ravel(), minlength=len(STRUCTURES) + 1)[1:]
        if present.min() >= 20:
            break
    else:  # pragma: no cover - the layout leaves room for every structure
        raise RuntimeError("could not place every structure in the phantom; enlarge fov_mm")
    organ, tumor = task_masks(phantom, spec)
    label = encode_task_label(spec, organ, tumor)
    image = np.clip(np.round(phantom.image), -1024, 3071).astype(np.int16)
    structures = phantom.structures
    shape = np.array(image.shape)
    table = rng.uniform(-50.0, 50.0, size=3)  # where the scanner's world origin lies
    first = table - (shape - 1) / 2.0 * np.asarray(spacing)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = first
    if rng.uniform() < 0.5:  # LPS storage: first two array axes reversed, negative affine columns
        image, label, structures = (a[::-1, ::-1].copy() for a in (image, label, structures))
        affine[:2, :2] *= -1.0
        affine[:2, 3] = first[:2] + (shape[:2] - 1) * np.asarray(spacing[:2])
    return SynthCase(image, label, affine, structures)


def _realistic_case(spec: TaskSpec, rng: np.random.Generator, fov_mm: Sequence[float], max_slices: int) -> SynthCase:
    """A case on a MOTS-sized grid: 512 x 512 in-plane at 0.6-1.0 mm, 40-``max_slices`` slices at 0.7-5 mm.

    The slice spacing is drawn first and the slice count within 40-``max_slices`` so that the scan covers
    150-1000 mm, as real CTs do. A miniature phantom (``_demo_case``) is stretched to the full grid with
    nearest-neighbour indexing, plus per-slice scanner noise: the arrays have real CT sizes, not real CT detail.
    """
    in_plane, slice_mm = rng.uniform(0.6, 1.0), rng.uniform(0.7, 5.0)
    low = int(np.clip(np.ceil(150.0 / slice_mm), 40, max_slices))
    high = int(np.clip(np.floor(1000.0 / slice_mm), low, max_slices))
    shape = (512, 512, int(rng.integers(low, high + 1)))
    coarse = _demo_case(spec, rng, fov_mm)
    index = np.ix_(*[np.minimum((np.arange(n) * c) // n, c - 1) for n, c in zip(shape, coarse.image.shape)])
    noise = np.round(rng.normal(0.0, 8.0, size=(4, 512, 512))).astype(np.int16)
    image = coarse.image[index]
    for z in range(shape[2]):
        image[:, :, z] += noise[z % 4]
    spacing = np.array([in_plane, in_plane, slice_mm])
    affine = np.diag([*spacing, 1.0])
    affine[:3, :3] = coarse.affine[:3, :3] / np.linalg.norm(coarse.affine[:3, :3], axis=0) * spacing
    centre = coarse.affine[:3, :3] @ ((np.array(coarse.image.shape) - 1) / 2.0) + coarse.affine[:3, 3]
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return SynthCase(image, coarse.label[index], affine, coarse.structures[index])


def _check_size(size: str, max_slices: int) -> None:
    if size not in SIZE_MODES:
        raise ValueError(f"size must be one of {list(SIZE_MODES)}, got {size!r}")
    if int(max_slices) != max_slices or max_slices < 1:
        raise ValueError(f"max_slices must be a positive integer, got {max_slices!r}")


def generate_case(
    task: Union[str, int, TaskSpec],
    rng: np.random.Generator,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    size: str = "demo",
    max_slices: int = DEFAULT_MAX_SLICES,
) -> SynthCase:
    """One synthetic CT volume with its task's label, in a random anisotropic spacing and storage order.

    Args:
        task: the task (name or id) whose source convention the label follows.
        rng: the case's random generator.
        fov_mm: field of view in mm of the phantom.
        size: ``"demo"``: ``fov_mm`` at 0.7-0.9 mm in-plane and 1.5-2.5 mm between slices (at most
            64 x 64 x 32 voxels after the bundle's resampling); ``"realistic"``: the phantom stretched to a
            MOTS-sized grid, 512 x 512 at 0.6-1.0 mm, 40-``max_slices`` slices at 0.7-5 mm covering 150-1000 mm.
        max_slices: upper bound of a realistic case's slice count (also below 40, for quick tests).

    Returns:
        a ``SynthCase``: int16 (X, Y, Z) HU image, uint8 (X, Y, Z) label with the task's source values,
        the 4x4 voxel-to-world (RAS mm) affine shared by both and the phantom's structure map; arrays
        are stored in RAS or LPS order (chosen at random, as real CT archives mix them).

    Raises:
        ValueError: an unknown ``size`` or a ``max_slices`` below 1.
    """
    _check_size(size, max_slices)
    spec = task if isinstance(task, TaskSpec) else resolve_task(task)
    if size == "realistic":
        return _realistic_case(spec, rng, fov_mm, int(max_slices))
    return _demo_case(spec, rng, fov_mm)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Write ``array`` as NIfTI with its affine (qform and sform, mm units), atomically."""
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp))


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (POSIX ``flock``; no lock where unavailable), so concurrent
    processes (e.g. DDP ranks) generate a data set once."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _split_counts(num_per_task: int, num_val_per_task: int, num_test_per_task: int) -> Dict[str, int]:
    counts = {"training": num_per_task, "validation": num_val_per_task, "test": num_test_per_task}
    for name, n in counts.items():
        if int(n) != n or n < 0:
            raise ValueError(f"the number of {name} cases per task must be a non-negative integer, got {n!r}")
    if counts["training"] < 1:
        raise ValueError(f"num_per_task (training cases per task) must be >= 1, got {num_per_task}")
    return {k: int(v) for k, v in counts.items()}


def ensure_mots_synth(
    cache_dir: Union[str, os.PathLike],
    num_per_task: int = 12,
    seed: int = 0,
    num_val_per_task: int = 1,
    num_test_per_task: int = 2,
    tasks: Union[None, str, Sequence[Union[str, int]]] = None,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    size: str = "demo",
    max_slices: int = DEFAULT_MAX_SLICES,
    workers: int = 1,
) -> Path:
    """Generate MOTS-synth into ``cache_dir`` once and return the path of its datalist JSON.

    The data set lives in ``cache_dir/mots_synth_v<version>_seed<seed>_<train>-<val>-<test>[...]/``
    (``images/``, ``labels/``, ``datalist.json``, ``synth.json`` with the parameters). A complete
    data set (its datalist and every file it lists) is reused as is; missing files are regenerated.
    Every file is written atomically and the datalist last, so an interrupted run leaves no datalist
    that points at partial files; a file lock makes concurrent callers generate it once.

    Args:
        cache_dir: folder holding generated data sets (created if needed).
        num_per_task: training volumes per task.
        seed: the data set's seed (same seed and sizes -> identical files).
        num_val_per_task: validation volumes per task.
        num_test_per_task: held-out test volumes per task.
        tasks: the tasks to generate (default: all seven; names, ids or a comma-separated string).
        fov_mm: field of view of each volume's phantom in mm (x, y, z).
        size: ``"demo"`` (miniature volumes) or ``"realistic"`` (MOTS-sized grids), see ``generate_case``.
        max_slices: upper bound of a realistic volume's slice count.
        workers: processes writing the missing volumes (each volume has its own random stream, so the
            files do not depend on this); 1 writes them in this process.

    Returns:
        the datalist JSON path: ``{"training": [...], "validation": [...], "test": [...]}``, items
        ``{"image": "images/<case>.nii.gz", "label": "labels/<case>.nii.gz", "task": "<name>"}`` with
        paths relative to the datalist's folder.
    """
    from scripts.tasks import resolve_tasks

    _check_not_importing_main()
    counts = _split_counts(num_per_task, num_val_per_task, num_test_per_task)
    _check_size(size, max_slices)
    specs = resolve_tasks(tasks)
    fov = tuple(float(f) for f in fov_mm)
    if len(fov) != 3 or min(fov) < 32.0:
        raise ValueError(f"fov_mm must be three sizes of at least 32 mm, got {list(fov_mm)}")
    name = f"mots_synth_v{SYNTH_VERSION}_seed{int(seed)}_{counts['training']}-{counts['validation']}-{counts['test']}"
    if specs != TASKS:
        name += "_" + "-".join(str(s.id) for s in specs)
    if fov != DEFAULT_FOV_MM:
        name += "_fov" + "x".join(f"{f:g}" for f in fov)
    if size != "demo":
        name += f"_{size}" + (f"{int(max_slices)}" if int(max_slices) != DEFAULT_MAX_SLICES else "")
    root = Path(cache_dir).expanduser() / name
    datalist_path = root / "datalist.json"
    if _complete(datalist_path):
        return datalist_path
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if _complete(datalist_path):
            return datalist_path
        datalist: Dict[str, List[Dict[str, str]]] = {split: [] for split in SPLITS}
        missing: List[_CaseJob] = []
        for split in SPLITS:
            for spec in specs:
                for index in range(counts[split]):
                    case = f"{spec.name}_{split[:5]}_{index:03d}"
                    item = {"image": f"images/{case}.nii.gz", "label": f"labels/{case}.nii.gz", "task": spec.name}
                    if not ((root / item["image"]).is_file() and (root / item["label"]).is_file()):
                        job = _CaseJob(root, item, spec.id, split, index, int(seed), fov, size, int(max_slices))
                        missing.append(job)
                    datalist[split].append(item)
        _write_cases(missing, workers)
        params = {"version": SYNTH_VERSION, "seed": int(seed), "cases_per_task": counts, "fov_mm": list(fov)}
        params["tasks"] = [s.name for s in specs]
        if size != "demo":  # demo data sets keep their earlier synth.json
            params.update(size=size, max_slices=int(max_slices))
        write_json_atomic(params, root / "synth.json")
        write_json_atomic(datalist, datalist_path)
    return datalist_path


class _CaseJob(NamedTuple):
    """One volume for ``_write_case``: where it goes and what it is drawn from."""

    root: Path
    item: Dict[str, str]
    task_id: int
    split: str
    index: int
    seed: int
    fov: Tuple[float, ...]
    size: str
    max_slices: int


def _write_case(job: _CaseJob) -> None:
    """Generate one volume from its own random stream and write its image and label atomically."""
    rng = case_rng(job.seed, job.task_id, job.split, job.index)
    case_data = generate_case(resolve_task(job.task_id), rng, job.fov, job.size, job.max_slices)
    _save_nifti(case_data.image, case_data.affine, job.root / job.item["image"])
    _save_nifti(case_data.label, case_data.affine, job.root / job.item["label"])


_MAIN_GUARD_HINT = (
    "spawned worker processes import the main module again: call ensure_mots_synth (or what calls it) under "
    "`if __name__ == '__main__':` in a script, or pass workers=1"
)


def _check_not_importing_main() -> None:
    """Raise ``RuntimeError`` in a spawned worker that is importing the caller's main module.

    A script that calls ``ensure_mots_synth(workers > 1)`` at top level would run the call again in every worker,
    which would then wait for the lock its parent holds (a silent hang); multiprocessing marks such a worker
    as ``_inheriting`` while it imports the main module (the check ``multiprocessing.spawn`` makes itself).
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(f"MOTS-synth generation started inside a worker process: {_MAIN_GUARD_HINT}")


def _write_cases(jobs: Sequence[_CaseJob], workers: int) -> None:
    """Write ``jobs`` in order in this process (``workers`` <= 1) or across ``workers`` spawned processes."""
    workers = min(int(workers), len(jobs))
    if workers <= 1:
        for job in jobs:
            _write_case(job)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    # spawned, not forked: the caller may hold torch's thread pools or other threads (the demo's progress bar)
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for _ in pool.map(_write_case, jobs):
                pass
    except BrokenProcessPool:
        raise RuntimeError(
            f"a MOTS-synth worker process failed to start or died (for a script that generates at top level: "
            f"{_MAIN_GUARD_HINT})"
        ) from None


def _complete(datalist_path: Path) -> bool:
    """True when the datalist exists and every image/label it lists is a file."""
    if not datalist_path.is_file():
        return False
    try:
        datalist = json.loads(datalist_path.read_text())
    except (OSError, ValueError):
        return False
    root = datalist_path.parent
    items = [item for split in SPLITS for item in datalist.get(split, [])]
    return all((root / item["image"]).is_file() and (root / item["label"]).is_file() for item in items)
