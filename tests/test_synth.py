"""MOTS-synth: every volume holds every structure, labels mark only the own task in its source convention,
generation is deterministic and cached, and the geometry survives the bundle's preprocessing."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.paths import BUNDLE_ROOT
from scipy import ndimage

from scripts.data.label_mapping import MapTaskLabelsd
from scripts.data.synth import (
    STRUCTURES,
    TASK_STRUCTURES,
    case_rng,
    encode_task_label,
    ensure_mots_synth,
    generate_case,
    make_phantom,
)
from scripts.data.transforms import ct_preprocessing
from scripts.tasks import TASKS, task_by_name

# plausible contrast-enhanced CT HU ranges of each structure's median (noise and texture included)
HU_RANGES = {
    "liver": (80, 130),
    "hepatic_vessel": (150, 260),
    "kidney": (100, 210),
    "pancreas": (30, 100),  # partial volume with the surrounding fat
    "spleen": (100, 160),
    "lung": (-900, -700),
    "liver_tumor": (20, 180),
    "lung_tumor": (-450, 70),  # small nodules: many voxels share partial volume with the lung
    "pancreas_tumor": (0, 60),
}


@pytest.fixture(scope="module")
def cases():
    """One generated case per task (seed 0, training index 0)."""
    return {spec.name: generate_case(spec, case_rng(0, spec.id, "training", 0)) for spec in TASKS}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return ensure_mots_synth(tmp_path_factory.mktemp("cache"), num_per_task=1, num_val_per_task=0, num_test_per_task=1)


def test_every_volume_contains_every_structure_with_plausible_hu(cases) -> None:
    for name, case in cases.items():
        counts = np.bincount(case.structures.ravel(), minlength=len(STRUCTURES) + 1)[1:]
        missing = [s for s, n in zip(STRUCTURES, counts) if n < 20]
        assert not missing, f"{name} volume lacks {missing}"
        for structure, (low, high) in HU_RANGES.items():
            hu = np.median(case.image[case.structures == STRUCTURES.index(structure) + 1])
            assert low <= hu <= high, f"{name} volume: median HU of {structure} is {hu}"
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.image.min() <= -900  # air around the body


def test_phantoms_vary_with_the_seed() -> None:
    a, b = (make_phantom(np.random.default_rng(s)) for s in (1, 2))
    liver = STRUCTURES.index("liver") + 1
    assert (a.structures == liver).sum() != (b.structures == liver).sum()
    assert not np.array_equal(a.image, b.image)


def test_labels_mark_only_the_own_task_in_its_source_convention(cases) -> None:
    mapper = MapTaskLabelsd()
    for spec in TASKS:
        case = cases[spec.name]
        assert set(np.unique(case.label).tolist()) == set(spec.source_values), spec.name
        target = mapper({"label": torch.as_tensor(case.label[None]), "task": spec.name})["label"].numpy()
        organ_names, tumor_names = TASK_STRUCTURES[spec.name]
        for channel, rule, names in ((0, spec.organ_rule, organ_names), (1, spec.tumor_rule, tumor_names)):
            if rule is None:
                assert (target[channel] == -1).all(), f"{spec.name} channel {channel} must be unlabeled"
                continue
            expected = np.isin(case.structures, [STRUCTURES.index(n) + 1 for n in names])
            if spec.name == "hepatic_vessel" and channel == 0:  # vessels inside a tumor are written as tumor
                expected &= ~np.isin(case.structures, [STRUCTURES.index("liver_tumor") + 1])
            np.testing.assert_array_equal(target[channel] == 1, expected, err_msg=f"{spec.name} channel {channel}")
        labeled = np.isin(case.structures, [STRUCTURES.index(n) + 1 for n in organ_names + tumor_names])
        others = np.isin(case.structures, [i + 1 for i, s in enumerate(STRUCTURES) if s not in organ_names])
        assert (case.label[others & ~labeled] == 0).all(), f"{spec.name} labels another task's structure"
        assert others.sum() > 1000  # the other tasks' structures are present but unlabeled


def test_source_conventions_examples(cases) -> None:
    s = cases
    colon_tumor = STRUCTURES.index("colon_tumor") + 1
    assert set(np.unique(s["colon"].label[s["colon"].structures == colon_tumor])) == {1}
    assert (s["colon"].label[s["colon"].structures == STRUCTURES.index("colon") + 1] == 0).all()  # organ unlabeled
    assert set(np.unique(s["spleen"].label)) == {0, 1}
    vessel = s["hepatic_vessel"]
    assert set(np.unique(vessel.label[vessel.structures == STRUCTURES.index("hepatic_vessel") + 1])) == {1}
    assert set(np.unique(vessel.label[vessel.structures == STRUCTURES.index("liver_tumor") + 1])) == {2}
    assert (vessel.label[vessel.structures == STRUCTURES.index("liver") + 1] == 0).all()
    liver = s["liver"]
    assert set(np.unique(liver.label[liver.structures == STRUCTURES.index("hepatic_vessel") + 1])) == {1}


def test_encode_task_label_inverts_the_rules() -> None:
    organ = np.array([0, 1, 1, 0, 1], bool)
    tumor = np.array([0, 0, 1, 1, 1], bool)
    np.testing.assert_array_equal(encode_task_label(task_by_name("liver"), organ, tumor), [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(encode_task_label(task_by_name("hepatic_vessel"), organ, tumor), [0, 1, 2, 2, 2])
    np.testing.assert_array_equal(encode_task_label(task_by_name("colon"), organ, tumor), [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(encode_task_label(task_by_name("spleen"), organ, tumor), [0, 1, 1, 0, 1])


def test_generation_is_deterministic_and_cached(dataset: Path, tmp_path: Path) -> None:
    """Also: two worker processes write the same files as one (``dataset`` is written in-process)."""
    datalist = json.loads(dataset.read_text())
    assert [len(datalist[k]) for k in ("training", "validation", "test")] == [7, 0, 7]
    assert sorted({it["task"] for it in datalist["training"]}) == sorted(t.name for t in TASKS)
    again = ensure_mots_synth(tmp_path, num_per_task=1, num_val_per_task=0, num_test_per_task=1, workers=2)
    for item in datalist["training"] + datalist["test"]:
        for key in ("image", "label"):
            assert not Path(item[key]).is_absolute()
            a, b = nib.load(str(dataset.parent / item[key])), nib.load(str(again.parent / item[key]))
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_array_equal(a.affine, b.affine)
    other = generate_case("liver", case_rng(1, 0, "training", 0))
    first = nib.load(str(dataset.parent / datalist["training"][0]["image"]))
    assert other.image.shape != first.shape or not np.array_equal(other.image, np.asarray(first.dataobj))
    # a complete cache is reused as is; a deleted file is regenerated identically
    target = dataset.parent / datalist["test"][0]["label"]
    stamp = target.stat().st_mtime_ns
    assert ensure_mots_synth(dataset.parent.parent, 1, 0, 0, 1) == dataset
    assert target.stat().st_mtime_ns == stamp
    reference = np.asarray(nib.load(str(target)).dataobj)
    target.unlink()
    ensure_mots_synth(dataset.parent.parent, 1, 0, 0, 1)
    np.testing.assert_array_equal(np.asarray(nib.load(str(target)).dataobj), reference)
    assert not list(dataset.parent.rglob(".tmp-*"))  # atomic writes leave no temporary files


def test_geometry_spacing_orientation_and_preprocessed_size(dataset: Path) -> None:
    from monai.transforms import Compose

    datalist = json.loads(dataset.read_text())
    preprocess = Compose(ct_preprocessing(label_keys=["label"]))
    orders = set()
    for item in datalist["training"]:
        img = nib.load(str(dataset.parent / item["image"]))
        zooms = img.header.get_zooms()
        assert 0.7 <= zooms[0] == zooms[1] <= 0.9 and 1.5 <= zooms[2] <= 2.5
        assert np.array_equal(img.affine, nib.load(str(dataset.parent / item["label"])).affine)
        orders.add("".join(nib.aff2axcodes(img.affine)))
        data = preprocess({"image": str(dataset.parent / item["image"]), "label": str(dataset.parent / item["label"])})
        shape = tuple(data["image"].shape[1:])
        assert all(abs(s - e) <= 2 for s, e in zip(shape, (64, 64, 32))), shape
        label = data["label"][0].numpy()
        if item["task"] in ("liver", "lung"):  # RAS after preprocessing: liver on the right, lungs superior
            x, _, z = (np.argwhere(label > 0).mean(0) / np.array(shape)).tolist()
            if item["task"] == "liver":
                assert x > 0.55, f"liver centroid x fraction {x}"
            else:
                assert z > 0.55, f"lung tumor centroid z fraction {z}"
    assert orders <= {"RAS", "LPS"}


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_per_task"):
        ensure_mots_synth("unused", num_per_task=0)
    with pytest.raises(ValueError, match="validation"):
        ensure_mots_synth("unused", num_val_per_task=-1)
    with pytest.raises(ValueError, match="fov_mm"):
        ensure_mots_synth("unused", fov_mm=(10, 10, 10))
    with pytest.raises(ValueError, match="unknown task"):
        ensure_mots_synth("unused", tasks="brain")
    with pytest.raises(ValueError, match="size must be one of"):
        ensure_mots_synth("unused", size="huge")
    with pytest.raises(ValueError, match="max_slices"):
        generate_case("liver", np.random.default_rng(0), size="realistic", max_slices=0)


def test_generation_with_workers_from_an_unguarded_script_fails_instead_of_hanging(tmp_path: Path) -> None:
    # a script calling ensure_mots_synth(workers=2) at top level: every spawned worker runs the script again;
    # it must stop with the fix in its message, not wait forever for the lock the parent holds
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
            import sys
            sys.path.insert(0, {str(BUNDLE_ROOT)!r})
            from scripts.data.synth import ensure_mots_synth
            ensure_mots_synth({str(tmp_path / "cache")!r}, num_per_task=2, num_val_per_task=0, num_test_per_task=0,
                              tasks="spleen", workers=2)
            """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "if __name__ == '__main__':" in result.stderr
    guarded = tmp_path / "guarded.py"
    body = "".join("    " + line + "\n" for line in script.read_text().strip().splitlines())
    guarded.write_text("def main():\n" + body + "\n\nif __name__ == '__main__':\n    main()\n")
    subprocess.run([sys.executable, str(guarded)], check=True, capture_output=True, timeout=300)
    assert len(list((tmp_path / "cache").glob("*/images/*.nii.gz"))) == 2


DEMO_SHA256 = "9cbad8fa8694d80e"
"""Leading hex digits of the SHA-256 of the demo cases below (image, label, affine, structures), as generated
before ``size`` existed: the default output must not change without a new ``SYNTH_VERSION``."""


def test_default_size_is_the_demo_output_bit_for_bit() -> None:
    digest = hashlib.sha256()
    for task in ("liver", "spleen", "hepatic_vessel"):
        for seed in range(2):
            default = generate_case(task, case_rng(seed, 0, "training", seed))
            demo = generate_case(task, case_rng(seed, 0, "training", seed), size="demo")
            for a, b in zip(default, demo):
                np.testing.assert_array_equal(a, b)
                digest.update(np.ascontiguousarray(a).tobytes())
    assert digest.hexdigest()[:16] == DEMO_SHA256


def test_realistic_cases_have_mots_sizes() -> None:
    slices = []
    for seed in range(4):
        case = generate_case("kidney", np.random.default_rng(seed), size="realistic", max_slices=60)
        spacing = np.linalg.norm(case.affine[:3, :3], axis=0)
        assert case.image.shape[:2] == (512, 512) and 40 <= case.image.shape[2] <= 60
        assert case.image.dtype == np.int16 and case.label.dtype == np.uint8
        assert case.label.shape == case.structures.shape == case.image.shape
        assert 0.6 <= spacing[0] == spacing[1] <= 1.0 and 0.7 <= spacing[2] <= 5.0
        assert set(np.unique(case.label).tolist()) == {0, 1, 2}
        assert case.image.shape[2] * spacing[2] >= min(150.0, 60 * spacing[2])  # 150-1000 mm unless capped
        slices.append(case.image.shape[2])
    assert len(set(slices)) > 1


def test_realistic_data_set_through_synth_options(tmp_path: Path) -> None:
    """``train.json``'s ``synth_options`` reach ``ensure_mots_synth``: a cached realistic data set of its own."""
    from scripts.data.datalist import load_datalist

    options = {"num_per_task": 1, "num_val_per_task": 0, "num_test_per_task": 0, "tasks": "spleen"}
    items = load_datalist("", cache_dir=tmp_path, synth_options={**options, "size": "realistic", "max_slices": 41})
    assert len(items) == 1 and items[0]["task"] == "spleen"
    image = nib.load(items[0]["image"])
    assert image.shape[:2] == (512, 512) and 40 <= image.shape[2] <= 41
    folder = Path(items[0]["image"]).parent.parent
    assert folder.name.endswith("_realistic41")
    assert json.loads((folder / "synth.json").read_text())["size"] == "realistic"
    demo = ensure_mots_synth(tmp_path, **options)
    assert demo.parent != folder and "size" not in json.loads((demo.parent / "synth.json").read_text())


def test_shapes_drawn_in_their_box_equal_the_whole_grid() -> None:
    """Balls, tubes and the deep-point pick work inside bounding boxes; the masks must be those of the whole
    grid, also for shapes that cross the grid's border or miss it."""
    from scripts.data.synth import _ball, _grid, _pick_inside, _segment_distance, _tube

    rng = np.random.default_rng(3)
    spacing = (0.8, 0.7, 1.9)
    pts = _grid((23, 19, 11), spacing, (0.4, -0.3, 0.2))
    for _ in range(40):
        center, radius = rng.uniform(-12, 12, size=3), rng.uniform(0.5, 6.0)
        np.testing.assert_array_equal(_ball(pts, center, radius), np.linalg.norm(pts - center, axis=-1) < radius)
        path = [rng.uniform(-14, 14, size=3) for _ in range(3)]
        radii = list(rng.uniform(0.5, 4.0, size=2))
        whole = (_segment_distance(pts, path[0], path[1]) < radii[0]) | (
            _segment_distance(pts, path[1], path[2]) < radii[1]
        )
        np.testing.assert_array_equal(_tube(pts, path, radii), whole)
    mask = np.linalg.norm(pts - np.array([6.0, 0.0, 0.0]), axis=-1) < 5.0  # touches the x border
    depth = ndimage.distance_transform_edt(mask, sampling=spacing)
    for margin in (1.0, 3.0, 50.0):
        expected = np.argwhere(depth >= margin) if (depth >= margin).any() else np.argwhere(depth >= 0.5 * depth.max())
        choice = expected[np.random.default_rng(7).integers(len(expected))]
        np.testing.assert_array_equal(
            _pick_inside(np.random.default_rng(7), pts, mask, margin, spacing), pts[tuple(choice)]
        )
