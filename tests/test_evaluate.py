"""Evaluation: metrics against hand-computed and brute-force values, label mappings, folder pairing and faults."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers.eval_oracle import IntensityOracle  # noqa: E402  (tests/ is on sys.path under pytest)
from scipy import ndimage
from scipy.spatial.distance import cdist

from scripts.evaluation.folders import (
    TOTALSEGMENTATOR_MAPPING,
    case_id,
    evaluate_folders,
    main,
    merged_mapping,
    pair_cases,
    resolve_label_mapping,
    source_mapping,
)
from scripts.evaluation.metrics import TABLE6_STRUCTURES, spacing_from_affine, structure_metrics, summarize
from scripts.tasks import merged_label_names, resolve_task

SPACING = (0.8, 0.8, 2.5)


def shifted_cubes(shift_axis: int, shift: int, size: int = 4, shape=(14, 14, 14)):
    """Two size^3 cubes, the second moved by ``shift`` voxels along ``shift_axis``."""
    a = np.zeros(shape, bool)
    a[2 : 2 + size, 2 : 2 + size, 2 : 2 + size] = True
    b = np.roll(a, shift, axis=shift_axis)
    return a, b


def brute_force(pred: np.ndarray, ref: np.ndarray, spacing, tol: float):
    """Independent reference: surface = mask minus its 6-connected erosion; all-pairs Euclidean distances in mm."""
    sp = np.asarray(spacing, float)
    sp_pred = np.argwhere(pred & ~ndimage.binary_erosion(pred)) * sp
    sp_ref = np.argwhere(ref & ~ndimage.binary_erosion(ref)) * sp
    d = cdist(sp_pred, sp_ref)
    d_pr, d_rp = d.min(axis=1), d.min(axis=0)
    hd95 = max(np.percentile(d_pr, 95), np.percentile(d_rp, 95))
    nsd = ((d_pr <= tol).sum() + (d_rp <= tol).sum()) / (len(d_pr) + len(d_rp))
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    return dice, hd95, nsd


# ---------------------------------------------------------------- metrics on constructed masks


@pytest.mark.parametrize("axis, expected_hd95", [(2, 2 * 2.5), (0, 2 * 0.8)])
def test_shifted_cubes_anisotropic_hand_computed(axis, expected_hd95):
    # 4^3 cubes shifted by 2 voxels: overlap 4*4*2 = 32 -> Dice 2*32/128 = 0.5.
    # Surface (56 voxels each): the leading face (16 voxels) is 2 voxels from the other surface,
    # i.e. > 5% of distances equal 2 * spacing[axis], so HD95 = 2 * spacing[axis] exactly.
    a, b = shifted_cubes(axis, 2)
    m = structure_metrics(a, b, SPACING, nsd_tolerance_mm=1.0)
    assert m["status"] == "ok"
    assert m["dice"] == pytest.approx(0.5)
    assert m["hd95_mm"] == pytest.approx(expected_hd95, rel=1e-5)
    assert (m["prediction_voxels"], m["reference_voxels"]) == (64, 64)


def test_nsd_constructed_case_by_hand():
    # Shift by 2 along the 2.5 mm axis. Directed distances per surface (56 voxels), by hand:
    # 16 x 5.0 (outer face), 12 x 2.5 (ring next to it), 24 x 0 (shared rings), 4 x 0.8 (inner face centre
    # one in-plane voxel from the other ring). Symmetric, so NSD = fraction of the 56 within tolerance.
    a, b = shifted_cubes(2, 2)
    assert structure_metrics(a, b, SPACING, nsd_tolerance_mm=0.5)["nsd"] == pytest.approx(24 / 56, rel=1e-5)
    assert structure_metrics(a, b, SPACING, nsd_tolerance_mm=2.0)["nsd"] == pytest.approx(28 / 56, rel=1e-5)
    assert structure_metrics(a, b, SPACING, nsd_tolerance_mm=2.5)["nsd"] == pytest.approx(40 / 56, rel=1e-5)
    assert structure_metrics(a, b, SPACING, nsd_tolerance_mm=5.0)["nsd"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 18, 12)
    grid = np.indices(shape).transpose(1, 2, 3, 0) * np.asarray(SPACING)

    def blob():
        centre = rng.uniform([4, 4, 8], [11, 10, 22])
        radii = rng.uniform([2.5, 2.5, 5.0], [5.0, 5.0, 9.0])
        return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0

    pred, ref = blob() | blob(), blob()
    m = structure_metrics(pred, ref, SPACING, nsd_tolerance_mm=1.5)
    dice, hd95, nsd = brute_force(pred, ref, SPACING, 1.5)
    assert m["dice"] == pytest.approx(dice, rel=1e-5)
    assert m["hd95_mm"] == pytest.approx(hd95, rel=1e-4)
    assert m["nsd"] == pytest.approx(nsd, rel=1e-5)


def test_empty_masks_are_scored_as_documented():
    a, _ = shifted_cubes(0, 0)
    empty = np.zeros_like(a)
    both = structure_metrics(empty, empty, SPACING)
    assert both["status"] == "both_empty" and both["dice"] == 1.0
    assert math.isnan(both["hd95_mm"]) and math.isnan(both["nsd"])
    for pred, ref, status in [(empty, a, "prediction_empty"), (a, empty, "reference_empty")]:
        m = structure_metrics(pred, ref, SPACING)
        assert m["status"] == status
        assert m["dice"] == 0.0 and m["nsd"] == 0.0 and math.isinf(m["hd95_mm"])


def test_identical_masks_touching_the_border():
    a = np.zeros((6, 6, 4), bool)
    a[:3, :, :2] = True  # touches three faces of the volume
    m = structure_metrics(a, a, SPACING)
    assert (m["dice"], m["hd95_mm"], m["nsd"]) == (pytest.approx(1.0), pytest.approx(0.0), pytest.approx(1.0))


def test_summary_means_policy_and_table6_average():
    rows = [
        {"structure": "liver", "dice": 0.9, "hd95_mm": 4.0, "nsd": 0.8, "status": "ok"},
        {"structure": "liver", "dice": 0.7, "hd95_mm": 6.0, "nsd": 0.6, "status": "ok"},
        {"structure": "liver tumor", "dice": 1.0, "hd95_mm": math.nan, "nsd": math.nan, "status": "both_empty"},
        {"structure": "liver tumor", "dice": 0.0, "hd95_mm": math.inf, "nsd": 0.0, "status": "prediction_empty"},
        {"structure": "liver tumor", "dice": 0.5, "hd95_mm": 10.0, "nsd": 0.4, "status": "ok"},
        {"case": "bad", "status": "error", "error": "unreadable"},
    ]
    s = summarize(rows)
    liver, tumor = s["structures"]["liver"], s["structures"]["liver tumor"]
    assert liver["dice_mean"] == pytest.approx(0.8) and liver["hd95_mm_mean"] == pytest.approx(5.0)
    assert (tumor["cases"], tumor["scored"], tumor["both_empty"], tumor["hd95_infinite"]) == (3, 2, 1, 1)
    assert tumor["dice_mean"] == pytest.approx(0.25) and tumor["hd95_mm_mean"] == pytest.approx(10.0)
    t6 = s["table6_average"]
    assert t6["classes"] == ["liver", "liver tumor"] and not t6["complete"]
    assert t6["dice"] == pytest.approx((0.8 + 0.25) / 2)
    counted = summarize(rows, both_empty="count")["structures"]["liver tumor"]
    assert counted["dice_mean"] == pytest.approx(0.5) and counted["hd95_mm_mean"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="both_empty"):
        summarize(rows, both_empty="ignore")


def test_table6_structures_are_the_eleven_merged_classes():
    assert len(TABLE6_STRUCTURES) == 11
    assert set(TABLE6_STRUCTURES) == set(merged_label_names().values()) - {"background"}


# ---------------------------------------------------------------- label mappings


def test_mapping_presets():
    merged = merged_mapping()
    assert set(merged) == set(TABLE6_STRUCTURES)
    # organ channels include their task's tumor where the source labels it inside the organ
    assert merged["liver"] == (1, 2) and merged["kidney"] == (3, 4) and merged["pancreas"] == (7, 8)
    assert merged["hepatic vessel"] == (5,) and merged["spleen"] == (11,) and merged["lung tumor"] == (10,)
    assert resolve_label_mapping("merged") == merged == resolve_label_mapping(None)
    assert resolve_label_mapping("TotalSegmentator") == {
        "liver": (5,),
        "kidney": (2, 3),
        "pancreas": (7,),
        "spleen": (1,),
    }
    assert resolve_label_mapping("totalsegmentator") == TOTALSEGMENTATOR_MAPPING
    assert source_mapping("kidney") == {"kidney": (1, 2), "kidney tumor": (2,)}
    assert resolve_label_mapping("source:hepatic_vessel") == {"hepatic vessel": (1,), "hepatic vessel tumor": (2,)}
    assert resolve_label_mapping("source:colon") == {"colon tumor": (1,)}
    assert resolve_label_mapping("source:spleen") == {"spleen": (1,)}


def test_mapping_from_dict_json_string_and_file(tmp_path):
    expected = {"liver": (5,), "kidney tumor": (3, 4)}
    assert resolve_label_mapping({"Liver": [5], "kidney_tumor": [4, 3]}) == expected
    assert resolve_label_mapping('{"liver": 5, "kidney tumor": [3, 4]}') == expected
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"liver": [5], "kidney tumor": [3, 4]}))
    assert resolve_label_mapping(str(f)) == expected


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"stomach": [6]}, "unknown structure 'stomach'"),
        ({"liver": [0]}, "integers >= 1"),
        ({"liver": []}, "non-empty list"),
        ({"liver": [1.5]}, "integers >= 1"),
        ("atlas", "unknown label mapping 'atlas'"),
        ("{not json", "not valid JSON"),
        ("source:brain", "unknown task"),
    ],
)
def test_bad_mappings_are_clear_errors(mapping, message):
    with pytest.raises(ValueError, match=message):
        resolve_label_mapping(mapping)


# ---------------------------------------------------------------- folders


AFFINE = np.diag([*SPACING, 1.0])
AFFINE[:3, 3] = (-10.0, 20.0, 5.0)


def save(path: Path, labels: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), affine), str(path))
    return path


def read_csv(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_liver_case(shift: int):
    """Merged prediction (liver 1 with a tumor 2 inside) and a LiTS-style reference (1 liver, 2 tumor)."""
    ref = np.zeros((16, 16, 12), np.uint8)
    ref[2:10, 2:10, 2:6] = 1
    ref[4:6, 4:6, 3:5] = 2
    pred = np.roll(ref, shift, axis=2)
    return pred, ref


def test_folder_evaluation_writes_csv_and_summary(tmp_path):
    preds, refs, out = tmp_path / "pred", tmp_path / "ref", tmp_path / "out"
    for name, shift in [("case_a", 0), ("case_b", 1)]:
        p, r = make_liver_case(shift)
        save(preds / f"{name}_seg.nii.gz", p)
        save(refs / f"{name}.nii.gz", r)
    # other files inference writes beside the label maps are not cases
    save(preds / "case_a_liver_mask.nii.gz", make_liver_case(0)[0])
    (preds / "case_a_report.json").write_text("{}")
    summary = evaluate_folders(preds, refs, out, mapping="source:liver", nsd_tolerance_mm=2.0)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "summary.json"]  # no temporary files left
    rows = read_csv(out / "metrics.csv")
    assert [(r["case"], r["structure"]) for r in rows] == [
        ("case_a", "liver"),
        ("case_a", "liver tumor"),
        ("case_b", "liver"),
        ("case_b", "liver tumor"),
    ]
    by = {(r["case"], r["structure"]): r for r in rows}
    assert float(by["case_a", "liver"]["dice"]) == 1.0 and float(by["case_a", "liver"]["hd95_mm"]) == 0.0
    # liver (organ incl. tumor) 8x8x4 shifted by one slice: overlap 8*8*3 -> Dice 0.75; HD95 one 2.5 mm slice
    assert float(by["case_b", "liver"]["dice"]) == pytest.approx(0.75, rel=1e-5)
    assert float(by["case_b", "liver"]["hd95_mm"]) == pytest.approx(2.5, rel=1e-5)
    # tumor 2x2x2 shifted by one slice: Dice 0.5
    assert float(by["case_b", "liver tumor"]["dice"]) == pytest.approx(0.5, rel=1e-5)
    assert by["case_b", "liver"]["task"] == "liver" and by["case_b", "liver"]["reference_voxels"] == "256"

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["cases"] == 2 and on_disk["cases_evaluated"] == 2 and on_disk["failed"] == []
    assert on_disk["nsd_tolerance_mm"] == 2.0
    assert on_disk["structures"]["liver"]["dice_mean"] == pytest.approx(0.875, rel=1e-5)
    assert on_disk["table6_average"]["dice"] == pytest.approx((0.875 + 0.75) / 2, rel=1e-5)
    assert on_disk["table6_average"]["classes"] == ["liver", "liver tumor"]


def test_totalsegmentator_reference(tmp_path):
    # TotalSegmentator-style reference: spleen 1, kidney_right 2, kidney_left 3, liver 5, stomach 6, pancreas 7
    ref = np.zeros((24, 20, 10), np.uint8)
    ref[1:9, 1:9, 1:8] = 5
    ref[12:16, 2:6, 2:6] = 2
    ref[12:16, 12:16, 2:6] = 3
    ref[18:22, 2:8, 2:7] = 1
    ref[2:6, 12:18, 2:6] = 6  # stomach: not a structure of this bundle, ignored
    ref[18:22, 12:18, 3:6] = 7
    pred = np.zeros_like(ref)
    pred[ref == 5] = 1
    pred[3:5, 3:5, 3:5] = 2  # a liver tumor inside the liver still counts as liver
    pred[(ref == 2) | (ref == 3)] = 3
    pred[12:16, 12:16, 2] = 0  # miss one of four slices of the left kidney
    pred[ref == 1] = 11
    pred[ref == 7] = 7
    pred[0, 0, 0] = 10  # a false-positive lung tumor: not in the reference mapping, not evaluated
    save(tmp_path / "p" / "s01_seg.nii.gz", pred)
    save(tmp_path / "r" / "s01.nii.gz", ref)
    summary = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", mapping="totalsegmentator")
    dice = {k: v["dice_mean"] for k, v in summary["structures"].items()}
    assert set(dice) == {"liver", "kidney", "pancreas", "spleen"}
    assert dice["liver"] == pytest.approx(1.0) and dice["spleen"] == pytest.approx(1.0)
    assert dice["pancreas"] == pytest.approx(1.0)
    assert dice["kidney"] == pytest.approx(2 * 112 / (112 + 128), rel=1e-5)


def test_unpaired_files_are_listed(tmp_path):
    p, r = make_liver_case(0)
    save(tmp_path / "p" / "a_seg.nii.gz", p)
    save(tmp_path / "p" / "b_seg.nii.gz", p)
    save(tmp_path / "r" / "a.nii.gz", r)
    save(tmp_path / "r" / "c.nrrd.nii.gz", r)
    with pytest.raises(ValueError) as err:
        evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", mapping="source:liver")
    assert "prediction without reference: b_seg.nii.gz" in str(err.value)
    assert "reference without prediction: c.nrrd.nii.gz" in str(err.value)
    assert not (tmp_path / "o").exists()
    s = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", mapping="source:liver", allow_unpaired=True)
    assert s["cases"] == 1 and s["unpaired"] == {"predictions": ["b_seg.nii.gz"], "references": ["c.nrrd.nii.gz"]}
    with pytest.raises(ValueError, match="no prediction/reference pairs .*prediction_suffix '_pred'"):
        evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", prediction_suffix="_pred", allow_unpaired=True)


def test_pairing_rules(tmp_path):
    assert case_id(Path("x/case_1.nii.gz")) == "case_1"
    assert case_id(Path("case_1_seg.NRRD"), "_seg") == "case_1"
    assert case_id(Path("case_1.nii.gz"), "_seg") is None
    assert case_id(Path("notes.txt")) is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pair_cases(tmp_path / "missing", tmp_path)
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "a.nii").write_bytes(b"")
    (tmp_path / "p" / "a.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="case 'a' has two files"):
        pair_cases(tmp_path / "p", tmp_path)


def test_bad_cases_are_reported_and_the_others_still_scored(tmp_path, capsys):
    p, r = make_liver_case(0)
    save(tmp_path / "p" / "good.nii.gz", p)
    save(tmp_path / "r" / "good.nii.gz", r)
    save(tmp_path / "p" / "shape.nii.gz", p[:, :, :10])
    save(tmp_path / "r" / "shape.nii.gz", r)
    moved = AFFINE.copy()
    moved[0, 3] += 4.0
    save(tmp_path / "p" / "affine.nii.gz", p, moved)
    save(tmp_path / "r" / "affine.nii.gz", r)
    (tmp_path / "p" / "corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08 definitely not a gzip stream")
    save(tmp_path / "r" / "corrupt.nii.gz", r)

    summary = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", "source:liver", prediction_suffix="")
    errors = {f["case"]: f["error"] for f in summary["failed"]}
    assert set(errors) == {"shape", "affine", "corrupt"}
    assert "shape.nii.gz: shape (16, 16, 10) differs from reference shape.nii.gz shape (16, 16, 12)" in errors["shape"]
    assert "affine.nii.gz: affine differs from reference affine.nii.gz by up to 4 mm" in errors["affine"]
    assert "corrupt.nii.gz: cannot read label map" in errors["corrupt"]
    assert summary["cases_evaluated"] == 1 and summary["structures"]["liver"]["dice_mean"] == pytest.approx(1.0)
    rows = read_csv(tmp_path / "o" / "metrics.csv")
    assert {r["case"]: r["status"] for r in rows if r["status"] == "error"} == {
        "shape": "error",
        "affine": "error",
        "corrupt": "error",
    }

    with pytest.raises(SystemExit) as code:
        main(
            [
                str(tmp_path / "p"),
                str(tmp_path / "r"),
                str(tmp_path / "cli"),
                "--mapping",
                "source:liver",
                "--prediction_suffix",
                "",
            ]
        )
    assert code.value.code == 1
    captured = capsys.readouterr()
    assert "FAILED corrupt" in captured.err and "1/4 case(s) evaluated" in captured.out


def test_cli_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as code:
        main([str(tmp_path / "nope"), str(tmp_path), str(tmp_path / "o")])
    assert code.value.code == 2
    assert "nope does not exist" in capsys.readouterr().err


def test_real_ct_totalsegmentator_reference(real_ct, tmp_path):
    """The shared TotalSegmentator label of a real CT as the reference, a merged map derived from it as prediction."""
    src = real_ct / "example_seg.nii.gz"
    img = nib.load(str(src))
    ts = np.asarray(img.dataobj).astype(np.int64)
    pred = np.zeros(ts.shape, np.uint8)
    pred[ts == 5] = 1
    pred[np.isin(ts, (2, 3))] = 3
    pred[ts == 7] = 7
    spleen = ts == 1
    pred[ndimage.binary_erosion(spleen)] = 11  # a spleen one voxel smaller all round
    save(tmp_path / "p" / "example_seg.nii.gz", pred, img.affine)
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "example.nii.gz").symlink_to(src)
    s = evaluate_folders(tmp_path / "p", tmp_path / "r", tmp_path / "o", mapping="totalsegmentator")
    assert spacing_from_affine(img.affine) == pytest.approx((3.0, 3.0, 3.0), rel=1e-4)
    for organ in ("liver", "kidney", "pancreas"):
        assert s["structures"][organ]["dice_mean"] == pytest.approx(1.0)
    eroded = ndimage.binary_erosion(spleen)
    dice, hd95, nsd = brute_force(eroded, spleen, (3.0, 3.0, 3.0), 2.0)
    spl = s["structures"]["spleen"]
    assert spl["dice_mean"] == pytest.approx(dice, rel=1e-5) and dice < 0.9
    assert spl["hd95_mm_mean"] == pytest.approx(hd95, rel=1e-4) and hd95 >= 3.0
    assert spl["nsd_mean"] == pytest.approx(nsd, rel=1e-5)


# ---------------------------------------------------------------- configs/evaluate.json (merged on train.json)


def run_evaluate_config(tmp_path: Path, bundle_root: Path, ckpt: Path, **overrides):
    from monai.bundle import ConfigWorkflow

    wf = ConfigWorkflow(
        config_file=[str(bundle_root / "configs" / "train.json"), str(bundle_root / "configs" / "evaluate.json")],
        meta_file=str(bundle_root / "configs" / "metadata.json"),
        logging_file=False,
        workflow_type=None,
        bundle_root=str(bundle_root),
        dataset_dir=str(tmp_path / "data"),
        datalist=str(tmp_path / "data" / "datalist.json"),
        ckpt_dir=str(tmp_path / "models"),
        ckpt_path=str(ckpt),
        output_dir=str(tmp_path / "eval"),
        patch_size=[48, 48, 32],  # one window covers a whole 40 x 40 x 20 test volume
        num_workers=0,
        network_def={"_target_": "helpers.eval_oracle.IntensityOracle"},
        **overrides,
    )
    wf.initialize()
    wf.run()
    wf.finalize()


def write_test_split(root: Path, tasks):
    from helpers.tiny_mots import SPACING as TINY_SPACING
    from helpers.tiny_mots import make_case, write_nifti

    items, cases = [], {}
    for seed, task in enumerate(tasks):
        image, label = make_case(resolve_task(task), (40, 40, 20), seed)
        name = f"test_{seed:03d}_{task}"
        write_nifti(root / "images" / f"{name}.nii.gz", image)
        write_nifti(root / "labels" / f"{name}.nii.gz", label)
        items.append({"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz", "task": task})
        cases[name] = (image, label)
    (root / "datalist.json").write_text(json.dumps({"training": items[:1], "validation": items[:1], "test": items}))
    return cases, TINY_SPACING


@pytest.mark.slow
def test_evaluate_config_scores_each_task_in_its_labeled_channels(tmp_path, bundle_root):
    if not (bundle_root / "configs" / "train.json").is_file():
        pytest.skip("configs/evaluate.json is merged on top of configs/train.json, which is absent")
    tasks = ["liver", "colon", "spleen", "kidney"]
    cases, spacing = write_test_split(tmp_path / "data", tasks)
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save({"model": IntensityOracle().state_dict()}, ckpt)

    run_evaluate_config(tmp_path, bundle_root, ckpt)

    rows = read_csv(tmp_path / "eval" / "metrics.csv")
    # only the channels each source labels: colon has no organ label, spleen no tumor label
    assert sorted((r["case"], r["structure"]) for r in rows) == [
        ("test_000_liver", "liver"),
        ("test_000_liver", "liver tumor"),
        ("test_001_colon", "colon tumor"),
        ("test_002_spleen", "spleen"),
        ("test_003_kidney", "kidney"),
        ("test_003_kidney", "kidney tumor"),
    ]
    for r in rows:
        image, label = cases[r["case"]]
        spec = resolve_task(r["task"])
        organ_rule, tumor_rule = spec.organ_rule, spec.tumor_rule
        is_tumor = r["structure"].endswith("tumor")
        rule = tumor_rule if is_tumor else organ_rule
        ref = label >= rule.min_value if rule.min_value is not None else label == rule.equals
        if is_tumor:  # what the oracle predicts: the tumor grown by one voxel in all 26 directions
            pred = ndimage.binary_dilation(ref, structure=np.ones((3, 3, 3), bool))
        else:
            pred = ref
        dice, hd95, nsd = brute_force(pred, ref, spacing, 2.0)
        assert r["status"] == "ok"
        assert float(r["dice"]) == pytest.approx(dice, rel=1e-5), r
        assert float(r["hd95_mm"]) == pytest.approx(hd95, rel=1e-4), r
        assert float(r["nsd"]) == pytest.approx(nsd, rel=1e-5), r
        assert int(r["reference_voxels"]) == int(ref.sum()) and int(r["prediction_voxels"]) == int(pred.sum())
    tumor_row = next(r for r in rows if r["structure"] == "liver tumor")
    # a one-voxel dilation: every surface distance lies between one in-plane step and the 3-D diagonal (mm)
    assert float(tumor_row["dice"]) < 0.6 and 0.8 < float(tumor_row["hd95_mm"]) <= math.hypot(0.8, 0.8, 1.5) + 1e-5

    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["complete"] and summary["cases"] == 4 and summary["failed"] == []
    t6 = summary["table6_average"]
    assert t6["classes"] == ["liver", "liver tumor", "kidney", "kidney tumor", "colon tumor", "spleen"]
    per = summary["structures"]
    assert t6["dice"] == pytest.approx(np.mean([per[s]["dice_mean"] for s in t6["classes"]]))
    assert per["liver"]["dice_mean"] == pytest.approx(1.0) and per["spleen"]["hd95_mm_mean"] == pytest.approx(0.0)


def test_evaluate_config_missing_weights_is_a_clear_error(tmp_path, bundle_root):
    if not (bundle_root / "configs" / "train.json").is_file():
        pytest.skip("configs/evaluate.json is merged on top of configs/train.json, which is absent")
    write_test_split(tmp_path / "data", ["spleen"])
    from scripts.networks.weights import MissingWeightsError

    with pytest.raises(Exception) as err:
        run_evaluate_config(tmp_path, bundle_root, tmp_path / "absent.pt")
    chain, e = [], err.value
    while e is not None:  # MONAI's config wraps errors; the cause is chained
        chain.append(e)
        e = e.__cause__ or e.__context__
    missing = [e for e in chain if isinstance(e, MissingWeightsError)]
    assert missing and str(tmp_path / "absent.pt") in str(missing[0]) and "Get weights by" in str(missing[0])
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_metrics_saver_keeps_going_after_a_bad_case(tmp_path):
    from types import SimpleNamespace

    from monai.data import MetaTensor

    from scripts.evaluation.handlers import StructureMetricsSaver

    affine = torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64))
    a, b = shifted_cubes(2, 2)
    good_pred = MetaTensor(torch.from_numpy(np.stack([a, a])).float(), affine=affine)
    good_label = MetaTensor(torch.from_numpy(np.stack([b, np.zeros_like(b)])).float(), affine=affine)
    good_label.meta["filename_or_obj"] = "/data/labels/case_good.nii.gz"
    bad_label = MetaTensor(torch.zeros(2, 4, 4, 4), affine=affine)
    bad_label.meta["filename_or_obj"] = "/data/labels/case_bad.nrrd"
    engine = SimpleNamespace(
        state=SimpleNamespace(
            output=[{"pred": good_pred, "label": good_label}, {"pred": good_pred, "label": bad_label}],
            batch=[{"task_id": torch.tensor(0)}, {"task_id": torch.tensor(0)}],
            metrics={},
        )
    )
    saver = StructureMetricsSaver(tmp_path / "out")
    saver.iteration_completed(engine)
    saver.completed(engine)
    rows = read_csv(tmp_path / "out" / "metrics.csv")
    assert [(r["case"], r["structure"], r["status"]) for r in rows] == [
        ("case_good", "liver", "ok"),
        ("case_good", "liver tumor", "reference_empty"),
        ("case_bad", "", "error"),
    ]
    assert float(rows[0]["dice"]) == pytest.approx(0.5) and float(rows[0]["hd95_mm"]) == pytest.approx(5.0)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["failed"][0]["case"] == "case_bad" and "shape" in summary["failed"][0]["error"]
    assert engine.state.metrics["table6_mean_dice"] == pytest.approx(0.25)

    # a run that dies later still leaves what was scored, marked incomplete, and the error propagates
    saver.reset()
    saver.iteration_completed(engine)
    (tmp_path / "out" / "summary.json").unlink()
    with pytest.raises(RuntimeError, match="out of memory"):
        saver.exception_raised(engine, RuntimeError("out of memory"))
    partial = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert partial["complete"] is False and partial["structures"]["liver"]["dice_mean"] == pytest.approx(0.5)


def test_evaluate_folders_config(tmp_path, bundle_root):
    from monai.bundle import ConfigWorkflow

    p, r = make_liver_case(1)
    save(tmp_path / "p" / "a_seg.nii.gz", p)
    save(tmp_path / "r" / "a.nii.gz", r)

    def run(**overrides):
        wf = ConfigWorkflow(
            config_file=str(bundle_root / "configs" / "evaluate_folders.json"),
            meta_file=str(bundle_root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=None,
            bundle_root=str(bundle_root),
            prediction_dir=str(tmp_path / "p"),
            reference_dir=str(tmp_path / "r"),
            output_dir=str(tmp_path / "o"),
            mapping="source:liver",
            **overrides,
        )
        wf.initialize()
        wf.run()

    run()
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["structures"]["liver"]["dice_mean"] == pytest.approx(0.75, rel=1e-5)
    assert [r["structure"] for r in read_csv(tmp_path / "o" / "metrics.csv")] == ["liver", "liver tumor"]

    (tmp_path / "p" / "b_seg.nii.gz").write_bytes(b"truncated")
    save(tmp_path / "r" / "b.nii.gz", r)
    with pytest.raises(Exception) as err:
        run()
    chain, e = [], err.value
    while e is not None:
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    assert any("1 of 2 case(s) failed" in m and "b_seg.nii.gz: cannot read label map" in m for m in chain)
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["cases_evaluated"] == 1


@pytest.mark.slow
def test_multi_gpu_evaluate_config_two_cpu_processes(tmp_path, bundle_root):
    """torchrun with 2 gloo processes: each scores its share, rank 0 writes every case once."""
    import os
    import subprocess
    import sys

    if not (bundle_root / "configs" / "train.json").is_file():
        pytest.skip("configs/evaluate.json is merged on top of configs/train.json, which is absent")
    write_test_split(tmp_path / "data", ["liver", "colon", "spleen"])
    ckpt = tmp_path / "models" / "model.pt"
    ckpt.parent.mkdir()
    torch.save({"model": IntensityOracle().state_dict()}, ckpt)
    configs = [str(bundle_root / "configs" / f) for f in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2"]
    cmd += ["-m", "monai.bundle", "run", "--config_file", repr(configs)]
    cmd += ["--meta_file", str(bundle_root / "configs" / "metadata.json")]
    cmd += ["--logging_file", str(bundle_root / "configs" / "logging.conf"), "--bundle_root", str(bundle_root)]
    cmd += ["--dataset_dir", str(tmp_path / "data"), "--datalist", str(tmp_path / "data" / "datalist.json")]
    cmd += ["--ckpt_dir", str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--num_workers", "0"]
    cmd += ["--patch_size", "[48, 48, 32]", "--network_def", "{'_target_': 'helpers.eval_oracle.IntensityOracle'}"]
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(bundle_root)]), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_csv(tmp_path / "eval" / "metrics.csv")
    assert sorted((r["case"], r["structure"]) for r in rows) == [
        ("test_000_liver", "liver"),
        ("test_000_liver", "liver tumor"),
        ("test_001_colon", "colon tumor"),
        ("test_002_spleen", "spleen"),
    ]
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["cases"] == 3
    assert not list((tmp_path / "eval").glob("*_rank*"))


def test_load_label_map_rejects_bad_maps(tmp_path):
    from scripts.evaluation.folders import load_label_map

    fractional = tmp_path / "fractional.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 0.5, np.float32), AFFINE), str(fractional))
    with pytest.raises(ValueError, match="fractional.nii.gz: label map holds non-integer values"):
        load_label_map(fractional)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.uint8), np.eye(4)), str(flat))
    with pytest.raises(ValueError, match=r"flat.nii.gz: expected a 3-D label map, got shape \(4, 4\)"):
        load_label_map(flat)
    with pytest.raises(FileNotFoundError, match="absent.nrrd: file not found"):
        load_label_map(tmp_path / "absent.nrrd")
    whole = tmp_path / "whole.nii.gz"
    nib.save(nib.Nifti1Image(np.full((4, 4, 4), 3.0, np.float32), AFFINE), str(whole))
    labels, affine = load_label_map(whole)
    assert labels.dtype == np.int32 and (labels == 3).all() and np.allclose(affine, AFFINE)
