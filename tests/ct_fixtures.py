"""Real-format CT test inputs: a DICOM series assembled from pydicom's CT_small.dcm, and an analytic phantom
written as NIfTI in any orientation and spacing."""

from __future__ import annotations

import copy
from pathlib import Path

import nibabel as nib
import numpy as np


def write_dicom_series(folder: Path, n_slices: int = 16, slice_mm: float = 5.0, chest: bool = False) -> Path:
    """A consistent axial series: CT_small.dcm (128×128, 0.66 mm pixels) repeated at increasing z positions; with
    ``chest`` its pixels are replaced by the chest phantom at 3 mm pixels (a 384 mm field of view with lungs)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    x0, y0, z0 = (float(v) for v in template.ImagePositionPatient)
    for k in range(n_slices):
        ds = copy.deepcopy(template)
        ds.ImagePositionPatient = [x0, y0, z0 + slice_mm * k]
        ds.SliceLocation = z0 + slice_mm * k
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = series
        ds.SliceThickness = slice_mm
        if chest:
            ds.PixelSpacing = [3.0, 3.0]
            ax = 3.0 * (np.arange(128) - 63.5)
            z = slice_mm * (k - (n_slices - 1) / 2.0)
            x, y = np.meshgrid(ax, ax, indexing="xy")
            hu = phantom_hu(x, -y, np.full_like(x, z))
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            ds.PixelData = np.rint((hu - intercept) / slope).astype(template.pixel_array.dtype).tobytes()
        ds.save_as(folder / f"slice_{k:03d}.dcm")
    return folder


def phantom_hu(x, y, z):
    """A smooth chest-like phantom in world (RAS, mm) coordinates: body, lungs, a heart and a bright spot."""
    def soft(d, width=3.0):
        return 1.0 / (1.0 + np.exp(np.clip(d / width, -50, 50)))

    def ellipsoid(cx, cy, cz, a, b, c):
        return (np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 + ((z - cz) / c) ** 2) - 1.0) * min(a, b, c)

    hu = -1000.0 + 900.0 * soft(ellipsoid(0, 0, 0, 110, 80, 400))  # body (fat-ish)
    lungs = np.maximum(soft(ellipsoid(-45, 0, 0, 35, 55, 90)), soft(ellipsoid(45, 0, 0, 35, 55, 90)))
    hu = hu + (-850.0 - hu) * lungs
    hu = hu + (40.0 - hu) * soft(ellipsoid(-10, 15, -5, 30, 25, 35))  # heart
    hu = hu + (700.0 - hu) * soft(ellipsoid(0, -55, 0, 10, 10, 400), 2.0)  # spine
    return hu


def write_phantom_nifti(path: Path, spacing: tuple[float, float, float], shape: tuple[int, int, int],
                        orientation: str = "RAS", dtype=np.int16) -> Path:
    """The phantom sampled on a grid centred at the world origin, written with an RAS or LPS affine."""
    signs = {"RAS": (1, 1, 1), "LPS": (-1, -1, 1)}[orientation]
    axes = [signs[a] * spacing[a] * (np.arange(shape[a]) - (shape[a] - 1) / 2.0) for a in range(3)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    data = phantom_hu(x, y, z)
    affine = np.diag([signs[0] * spacing[0], signs[1] * spacing[1], signs[2] * spacing[2], 1.0])
    affine[:3, 3] = [axes[0][0], axes[1][0], axes[2][0]]
    img = nib.Nifti1Image(np.rint(data).astype(dtype) if np.issubdtype(dtype, np.integer) else data.astype(dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path
