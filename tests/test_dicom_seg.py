"""DICOM SEG output: validity (dciodvfy), references to the source series, codes from the task table, and the
decoded segments equal to the NIfTI label map of the same run voxel for voxel, on the shared real 3-slice series
and on a generated oblique series whose files are not in slice order."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import nibabel as nib
import numpy as np
import pytest
from helpers.inference import TINY_NET, IntensityNet, phantom, run_workflow, save_checkpoint, tiny_dodnet, write_nifti

pydicom = pytest.importorskip("pydicom", reason="pydicom (installed with highdicom) is needed for DICOM SEG")
hd = pytest.importorskip("highdicom", reason="highdicom is needed for DICOM SEG output")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.sr._concepts_dict import concepts  # noqa: E402
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid  # noqa: E402

from scripts.inference.dicom_seg import parse_output_type  # noqa: E402
from scripts.tasks import STRUCTURE_CODES, merged_label_colors, merged_label_names, merged_structures  # noqa: E402

VERSION = json.loads((Path(__file__).resolve().parents[1] / "dodnet_bundle/configs/metadata.json").read_text())[
    "version"
]
ID_OF = {name: mid for mid, name in merged_label_names().items()}


# ----------------------------------------------------------------------------------------------------- helpers
def write_ct_series(
    folder: Path,
    hu: np.ndarray,
    pixel_spacing: Sequence[float] = (0.9, 1.1),
    slice_spacing: float = 2.0,
    oblique: bool = True,
    seed: int = 0,
) -> List[Path]:
    """Write ``hu`` (rows, cols, slices) as single-frame CT files; file names and instance numbers are shuffled so
    that neither follows the slice position. Rows/columns run along a direction rotated 20 deg about z and 10 deg
    about x (``oblique``)."""
    folder.mkdir(parents=True)
    a, b = (math.radians(20), math.radians(10)) if oblique else (0.0, 0.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    rot = rz @ rx
    row_dir, col_dir = rot[:, 0], rot[:, 1]
    normal = np.cross(row_dir, col_dir)
    origin = np.array([-30.0, -25.0, 40.0])
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    order = np.random.default_rng(seed).permutation(hu.shape[2])
    paths = []
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Oblique", "DODNET-TEST", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", ""
        ds.ReferringPhysicianName, ds.Modality, ds.Manufacturer, ds.SeriesNumber = "", "CT", "test", 3
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(order[k]) + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + k * slice_spacing * normal]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = slice_spacing
        ds.Rows, ds.Columns = hu.shape[0], hu.shape[1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(hu[:, :, k]).astype(np.int16).tobytes()
        path = folder / f"im{int(order[k]):03d}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def source_datasets(folder: Path) -> List[Dataset]:
    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in sorted(folder.iterdir())]


def on_instance(volume: np.ndarray, affine: np.ndarray, ds: Dataset) -> np.ndarray:
    """The (rows, cols) values of ``volume`` (a NIfTI array with its RAS ``affine``) at the pixels of a source
    instance, from the instance's own position, orientation and spacing (voxel centres must coincide)."""
    ipp = np.asarray(ds.ImagePositionPatient, dtype=np.float64)
    iop = np.asarray(ds.ImageOrientationPatient, dtype=np.float64)
    spacing_rows, spacing_cols = (float(v) for v in ds.PixelSpacing)
    r, c = np.meshgrid(np.arange(ds.Rows), np.arange(ds.Columns), indexing="ij")
    lps = ipp + c[..., None] * spacing_cols * iop[:3] + r[..., None] * spacing_rows * iop[3:]
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = nib.affines.apply_affine(np.linalg.inv(affine), ras)
    index = np.rint(ijk)
    assert np.abs(ijk - index).max() < 0.02, "source pixels are not voxel centres of the label map"
    index = index.astype(int)
    return volume[index[..., 0], index[..., 1], index[..., 2]]


def decoded_segments(seg_path: Path, sources: Sequence[Dataset]) -> Dict[str, np.ndarray]:
    """Segment label -> (instances, rows, cols) mask, frames looked up through each frame's source reference."""
    seg = hd.seg.segread(str(seg_path))
    uids = [ds.SOPInstanceUID for ds in sources]
    numbers = seg.get_segment_numbers()
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=numbers, combine_segments=False)
    return {seg.get_segment_description(n).SegmentLabel: pixels[..., k] for k, n in enumerate(numbers)}


def dciodvfy_errors(path: Path) -> List[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None,
    reason="dciodvfy not found (Debian package dicom3tools: apt-get update && apt-get install -y dicom3tools)",
)


# ---------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def stub_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(IntensityNet(), tmp_path_factory.mktemp("ckpt") / "stub.pt")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, real_ct, stub_ckpt):
    """The shared 3-slice GE series, liver task, both outputs."""
    out = tmp_path_factory.mktemp("real")
    series = real_ct / "dicom-3slice"
    summary = run_workflow(
        str(series), out, stub_ckpt, network_def=IntensityNet(), tasks="liver", postprocess=False, output_type="both"
    )
    assert summary["failed"] == [], summary["failed"]
    return out, series


@pytest.fixture(scope="module")
def oblique_series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("oblique") / "oblique_ct"
    write_ct_series(folder, phantom((28, 24, 12)))
    return folder


@pytest.fixture(scope="module")
def oblique_run(tmp_path_factory, oblique_series, stub_ckpt):
    """Liver and kidney on the oblique series: the stub gives both tasks the same masks, so kidney (painted over
    liver in the merged map) hides the liver: only kidney and kidney tumor are present."""
    out = tmp_path_factory.mktemp("oblique_out")
    summary = run_workflow(
        str(oblique_series),
        out,
        stub_ckpt,
        network_def=IntensityNet(),
        tasks="liver,kidney",
        postprocess=False,
        output_type="both",
    )
    assert summary["failed"] == [], summary["failed"]
    return out


# ------------------------------------------------------------------------------------------------------- tests
def test_output_type_values():
    assert parse_output_type("nifti") == (True, False)
    assert parse_output_type("dicom_seg") == (False, True)
    assert parse_output_type("both") == (True, True)
    with pytest.raises(ValueError, match="nifti, dicom_seg, both"):
        parse_output_type("rtstruct")


def test_structure_codes_cover_the_table_and_are_snomed_codes():
    """Every structure of the merged map has codes; each is the SNOMED CT concept pydicom knows under that value,
    categories from CID 7150 (segmentation property categories), types from CID 7151 (property types), regions
    (anatomic region of a tumor or vessel) from CID 7151 too (anatomic structures)."""
    assert set(STRUCTURE_CODES) == {name for _, name, _, _, _ in merged_structures()}
    by_value: Dict[str, List] = {}
    for entries in concepts["SCT"].values():
        for value, (meaning, cids) in entries.items():
            by_value.setdefault(value, []).append((meaning, cids))
    for name, codes in STRUCTURE_CODES.items():
        for pair, cid in ((codes.category, 7150), (codes.type, 7151)) + (
            ((codes.region, 7151),) if codes.region else ()
        ):
            known = by_value.get(pair[0], [])
            assert any(meaning == pair[1] and cid in cids for meaning, cids in known), (name, pair, known)
        assert ("tumor" in name) == (codes.type == ("108369006", "Neoplasm"))


def _check_seg_against_label_map(out: Path, case: str, series: Path, tasks: Sequence[str]) -> Dict[str, np.ndarray]:
    seg_path = out / f"{case}_seg.dcm"
    label_nii = nib.load(str(out / f"{case}_seg.nii.gz"))
    label, affine = np.asarray(label_nii.dataobj), label_nii.affine
    sources = source_datasets(series)
    segments = decoded_segments(seg_path, sources)
    wanted = [name for mid, name, spec, _, _ in merged_structures() if spec.name in tasks]
    present = [name for name in wanted if (label == ID_OF[name]).any()]
    assert sorted(segments) == sorted(present) and present  # one segment per structure found, no others
    for ds_index, ds in enumerate(sources):
        expected = on_instance(label, affine, ds)
        for name, masks in segments.items():
            np.testing.assert_array_equal(masks[ds_index], (expected == ID_OF[name]).astype(masks.dtype), name)
    return segments


def test_real_series_seg_equals_nifti_label_map(real_run):
    out, series = real_run
    segments = _check_seg_against_label_map(out, "dicom-3slice", series, ["liver"])
    assert set(segments) == {"liver", "liver tumor"} and all(m.sum() > 100 for m in segments.values())
    report = json.loads((out / "dicom-3slice_report.json").read_text())
    assert report["outputs"]["dicom_seg"] == str(out / "dicom-3slice_seg.dcm")
    assert report["dicom_seg"] == {"written": True, "source": "label_map", "segments": ["liver", "liver tumor"]}


def test_seg_references_and_describes_its_source(real_run):
    out, series = real_run
    seg = pydicom.dcmread(str(out / "dicom-3slice_seg.dcm"))
    sources = {ds.SOPInstanceUID: ds for ds in source_datasets(series)}
    first = next(iter(sources.values()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and seg.SegmentationType == "BINARY"
    for keyword in ("FrameOfReferenceUID", "StudyInstanceUID", "PatientID", "PatientName"):
        assert seg[keyword].value == first[keyword].value, keyword
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(sources)
    for frame in seg.PerFrameFunctionalGroupsSequence:  # each frame lies on the instance it references
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in position], [float(v) for v in sources[uid].ImagePositionPatient])
    colors = merged_label_colors()
    for item in seg.SegmentSequence:
        name = item.SegmentLabel
        codes = STRUCTURE_CODES[name]
        assert (
            item.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            item.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning,
        ) == codes.category
        assert (
            item.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            item.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
        ) == codes.type
        assert item.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
        if codes.region:
            assert item.AnatomicRegionSequence[0].CodeValue == codes.region[0]
        assert tuple(item.RecommendedDisplayCIELabValue) == hd.color.CIELabColor.from_rgb(*colors[ID_OF[name]]).value
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == "DoDNet"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "DoDNet" and algorithm.AlgorithmVersion == VERSION
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"


@needs_dciodvfy
def test_dciodvfy_reports_no_errors(real_run, oblique_run):
    for path in (real_run[0] / "dicom-3slice_seg.dcm", oblique_run / "oblique_ct_seg.dcm"):
        assert dciodvfy_errors(path) == [], path


def test_oblique_unordered_series_seg_equals_nifti_label_map(oblique_run, oblique_series):
    assert [p.name for p in sorted(oblique_series.iterdir())] != [
        p.name
        for p in sorted(oblique_series.iterdir(), key=lambda p: float(pydicom.dcmread(str(p)).ImagePositionPatient[2]))
    ]  # the files' name order is not their slice order
    segments = _check_seg_against_label_map(oblique_run, "oblique_ct", oblique_series, ["liver", "kidney"])
    assert set(segments) == {"kidney", "kidney tumor"}  # liver is painted over by kidney: not present, no segment


def test_per_structure_masks_become_overlapping_segments(tmp_path, oblique_series, stub_ckpt):
    summary = run_workflow(
        str(oblique_series),
        tmp_path,
        stub_ckpt,
        network_def=IntensityNet(),
        tasks="liver,kidney",
        postprocess=False,
        output_type="dicom_seg",
        save_masks=True,
    )
    assert summary["failed"] == []
    outputs = summary["succeeded"][0]["outputs"]
    assert "label_map" not in outputs and not (tmp_path / "oblique_ct_seg.nii.gz").exists()
    segments = decoded_segments(tmp_path / "oblique_ct_seg.dcm", source_datasets(oblique_series))
    assert sorted(segments) == ["kidney", "kidney tumor", "liver", "liver tumor"]
    for name, masks in segments.items():
        nii = nib.load(str(tmp_path / f"oblique_ct_{name.replace(' ', '_')}_mask.nii.gz"))
        for i, ds in enumerate(source_datasets(oblique_series)):
            np.testing.assert_array_equal(masks[i], on_instance(np.asarray(nii.dataobj), nii.affine, ds), name)
    assert (segments["liver"] & segments["kidney"]).any()  # the overlap survives
    report = json.loads((tmp_path / "oblique_ct_report.json").read_text())
    assert report["dicom_seg"]["source"] == "masks"


def test_no_structure_found_writes_no_seg_and_says_so(tmp_path, stub_ckpt):
    series = tmp_path / "air_ct"
    hu = np.full((20, 18, 6), -1000.0, dtype=np.float32)
    hu[3:17, 3:15, 1:5] = -20.0  # a body below every threshold of the stub
    write_ct_series(series, hu, oblique=False)
    summary = run_workflow(
        str(series), tmp_path / "out", stub_ckpt, network_def=IntensityNet(), tasks="liver", output_type="both"
    )
    assert summary["failed"] == []
    case = summary["succeeded"][0]
    assert "dicom_seg" not in case["outputs"] and not (tmp_path / "out" / "air_ct_seg.dcm").exists()
    report = json.loads((tmp_path / "out" / "air_ct_report.json").read_text())
    assert report["dicom_seg"]["written"] is False and "no structure found" in report["dicom_seg"]["reason"]
    assert report["dicom_seg"]["reason"] in case["warnings"]


def test_image_file_input_needs_a_dicom_source(tmp_path, stub_ckpt):
    src = write_nifti(tmp_path / "ct.nii.gz", phantom(), np.diag([0.8, 0.8, 1.5, 1.0]))
    only = run_workflow(str(src), tmp_path / "a", stub_ckpt, network_def=IntensityNet(), output_type="dicom_seg")
    assert only["succeeded"] == [] and len(only["failed"]) == 1
    message = only["failed"][0]["error"]
    assert "\n" not in message and str(src) in message and "DICOM SEG output needs a DICOM series folder" in message
    both = run_workflow(
        str(src), tmp_path / "b", stub_ckpt, network_def=IntensityNet(), tasks="liver", output_type="both"
    )
    case = both["succeeded"][0]
    assert (tmp_path / "b" / "ct_seg.nii.gz").is_file() and "dicom_seg" not in case["outputs"]
    assert any("DICOM SEG output needs a DICOM series folder" in w for w in case["warnings"])


def test_cli_output_type_dicom_seg_with_a_tiny_network(tmp_path, oblique_series, capsys):
    """``dodnet-segment --output_type dicom_seg`` with a tiny-width DoDNet checkpoint; threshold 0 makes every
    voxel foreground, so the SEG holds exactly the top structure of the merged map (liver tumor) everywhere."""
    from scripts.inference.cli import segment_main

    ckpt = save_checkpoint(tiny_dodnet(), tmp_path / "tiny.pt")
    overrides = [f"--{k}={json.dumps(v)}" if isinstance(v, list) else f"--{k}={v}" for k, v in TINY_NET.items()]
    args = [str(oblique_series), str(tmp_path / "out"), "--tasks=liver", f"--ckpt={ckpt}", "--device=cpu"]
    args += ["--output_type=dicom_seg", "--no_postprocess", "--threshold=0.0", "--progress=False", *overrides]
    segment_main(args)
    assert "oblique_ct_seg.dcm" in capsys.readouterr().out
    segments = decoded_segments(tmp_path / "out" / "oblique_ct_seg.dcm", source_datasets(oblique_series))
    assert list(segments) == ["liver tumor"] and all(m.all() for m in segments.values())
