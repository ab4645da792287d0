"""A minimal DICOM series writer (pydicom) for the input-check tests: axial slices, one series per call."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np


def write_series(
    folder: Path, hu: np.ndarray, modality: str = "CT", description: str = "", study: Optional[str] = None
) -> str:
    """Write ``hu`` (rows, cols, slices) as single-frame files of one new series into ``folder``; returns its UID."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    study, series = study or generate_uid(), generate_uid()
    for k in range(hu.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, study
        ds.PatientName, ds.PatientID, ds.Modality, ds.SeriesDescription = "Test", "T", modality, description
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [0.0, 0.0, 1.5 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.8, 0.8], 1.5
        ds.Rows, ds.Columns = hu.shape[0], hu.shape[1]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(hu[:, :, k]).astype(np.int16).tobytes()
        ds.save_as(str(folder / f"{series[-8:]}_{k:03d}.dcm"), enforce_file_format=True)
    return series
