"""Series quality control and heart localisation for real chest CTs (PACS exports).

A radiologist choosing the series for X-Cardia keeps a non-contrast CT that covers both lungs and the heart, with
enough thin-enough axial slices; they drop scouts, abdominal or head series, contrast-enhanced series and tilted or
non-axial reconstructions. :func:`series_qc` makes those judgements on the voxels (HU, RAS, known spacing) and
:func:`dicom_series_qc` on the DICOM headers; each finding is ``(severity, check, message)``.

Thresholds and their sources:

- *Body region.* Aerated lung: regions below −500 HU whose median is above −960 HU (lung parenchyma ≈ −850 HU; the
  air around the patient and bowel gas ≈ −1000 HU). Adult total lung volume at tidal breathing is 2.5–3.5 L (functional residual capacity; Quanjer et al.,
  Eur Respir J 1993); a chest CT, even in expiration, holds well over 1 L. Below :data:`MIN_LUNG_ML` the series is
  not a chest CT (abdomen, head, extremity): an error. Between that and :data:`FULL_LUNG_ML`: a warning (lung bases
  only, or a heart-centred field of view). Lung on one side only: a warning.
- *Contrast.* Unenhanced blood is 30–60 HU (3·Hb + 3; Bruder et al.), myocardium 40–55 HU; after iodinated contrast
  the blood pool reaches 150–400 HU (arterial or venous phase). The median HU of the soft tissue of the anterior
  mediastinum between the lungs above :data:`CONTRAST_MEDIAN_HU` flags a probable contrast-enhanced series: a warning
  (the method was trained and published on non-contrast CT).
- *Slices.* Fewer than 16 slices: a localizer or a fragment (error, in :mod:`xcardia.data.imaging`). Slices thicker
  than :data:`MAX_SLICE_MM` (5 mm): a warning — coronary calcium and wall borders blur (SCCT guidance uses 2.5–3 mm
  reconstructions for calcium scoring).
- *DICOM headers.* Gantry tilt ≠ 0 and non-axial orientation: warnings (resampling corrects the geometry, but such
  series are usually reformats or head protocols); several series in one folder: an error (the reader would mix
  them); a sharp lung kernel: a warning (noise texture differs from the soft-tissue kernels of routine chest CT).

Heart localisation (:func:`heart_centre`): from a heart mask when the manifest has one (TotalSegmentator's
``heart.nii.gz`` or any binary mask in the CT's space) — the mask's centroid; otherwise a heuristic: the mediastinum
is the soft tissue that has lung on both sides in the same axial row; the heart is its anterior part (anterior to the
spine) in the slices where it is widest (at least half its widest cross-section), and its centroid is taken. The heuristic's error on whole-chest synthetic CTs,
where the true centre is known, is measured by ``tests/test_qc.py`` and reported in ``data_cards/paper_cohort.md``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

MIN_LUNG_ML = 400.0
FULL_LUNG_ML = 1000.0
CONTRAST_MEDIAN_HU = 120.0
MAX_SLICE_MM = 5.0
LUNG_KERNELS = ("LUNG", "B60", "B70", "B80", "FC51", "FC52", "FC53", "YC", "BONEPLUS", "SHARP")


def _downsample(volume: np.ndarray, spacing: tuple[float, float, float], target_mm: float = 4.0):
    """Stride the volume to roughly ``target_mm`` voxels (QC needs anatomy, not detail)."""
    step = [max(1, int(round(target_mm / s))) for s in spacing]
    return volume[::step[0], ::step[1], ::step[2]], tuple(s * k for s, k in zip(spacing, step))


def _anatomy(volume: np.ndarray):
    """Lung (air-filled parenchyma) and soft tissue, as boolean arrays.

    Lung is each connected region below −500 HU whose median is above −960 HU: aerated lung (≈ −850 HU with texture),
    unlike the air around the patient or bowel gas (≈ −1000 HU). This works whether the field of view holds the whole
    body or a crop in which the lungs touch the border."""
    from scipy import ndimage

    air = volume < -500.0
    labels, n = ndimage.label(air)
    lung = np.zeros_like(air)
    if n:
        medians = ndimage.median(volume, labels, index=np.arange(1, n + 1))
        sizes = ndimage.sum(air, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero((np.asarray(medians) > -960.0) & (np.asarray(sizes) >= 8)) + 1
        lung = np.isin(labels, keep)
    soft = (volume > -50.0) & (volume < 600.0)
    return lung, soft


def _mediastinum(inner_air: np.ndarray, soft: np.ndarray) -> np.ndarray:
    """Soft tissue with air-filled lung on both sides in the same axial row (x direction)."""
    lung_left_of = np.maximum.accumulate(inner_air, axis=0)  # some lung at smaller x (patient's right, RAS)
    lung_right_of = np.maximum.accumulate(inner_air[::-1], axis=0)[::-1]
    return soft & lung_left_of & lung_right_of


def series_qc(volume_hu: np.ndarray, spacing_mm: tuple[float, float, float]) -> list[tuple[str, str, str]]:
    """Radiological checks of one CT volume (HU, RAS axes, ``spacing_mm`` per axis). Returns findings
    ``(severity, check, message)``; an empty list for a non-contrast chest CT covering both lungs."""
    findings = []
    vol, spacing = _downsample(np.asarray(volume_hu, dtype=np.float32), tuple(float(s) for s in spacing_mm))
    voxel_ml = float(np.prod(spacing)) / 1000.0
    inner_air, soft = _anatomy(vol)
    lung_ml = float(inner_air.sum()) * voxel_ml
    if lung_ml < MIN_LUNG_ML:
        findings.append(("error", "body_region", f"only {lung_ml:.0f} mL of aerated lung: no lungs in this series "
                                                 f"(an abdominal, head or extremity scan?); keep the chest CT series"))
        return findings
    if lung_ml < FULL_LUNG_ML:
        findings.append(("warning", "body_region", f"{lung_ml:.0f} mL of lung: the series covers part of the chest "
                                                   f"(lung bases, or a heart-centred field of view)"))
    xs = np.nonzero(inner_air)[0]
    centre_x = (vol.shape[0] - 1) / 2.0
    right, left = float((xs < centre_x).sum()), float((xs >= centre_x).sum())
    if min(right, left) < 0.15 * (right + left):
        findings.append(("warning", "body_region", "air-filled lung on one side only: check the field of view "
                                                   "covers both lungs"))
    mediastinum = _mediastinum(inner_air, soft)
    if mediastinum.sum() * voxel_ml < 50.0:
        findings.append(("warning", "body_region", "no mediastinal soft tissue between the lungs: the heart may be "
                                                   "outside the field of view"))
        return findings
    ys = np.nonzero(inner_air)[1]
    anterior = mediastinum.copy()
    anterior[:, : int(np.median(ys)), :] = False  # the heart and great vessels lie anterior to the spine
    values = vol[anterior] if anterior.any() else vol[mediastinum]
    median_hu = float(np.median(values))
    if median_hu > CONTRAST_MEDIAN_HU:
        findings.append(("warning", "contrast", f"median attenuation of the mediastinum is {median_hu:.0f} HU "
                                                f"(unenhanced blood: 30–60 HU): probably a contrast-enhanced series; "
                                                f"X-Cardia expects non-contrast CT — prefer the non-contrast series"))
    if max(spacing_mm) > MAX_SLICE_MM:
        findings.append(("warning", "slice_thickness", f"{max(spacing_mm):.1f} mm slices: prefer reconstructions of "
                                                       f"≤ {MAX_SLICE_MM:g} mm (calcium and wall borders blur)"))
    return findings


def dicom_series_qc(headers: list) -> list[tuple[str, str, str]]:
    """Header checks of one DICOM series folder (pydicom datasets read without pixels)."""
    findings = []
    series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
    if len(series) > 1:
        findings.append(("error", "mixed_series", f"{len(series)} series in one folder; put each series in its own "
                                                  f"folder and point ct_path at the non-contrast chest series"))
    tilts = {round(float(getattr(h, "GantryDetectorTilt", 0) or 0), 2) for h in headers}
    if any(t != 0 for t in tilts):
        findings.append(("warning", "gantry_tilt", f"gantry tilt {sorted(tilts)} degrees: the slices are sheared; "
                                                   f"prefer an untilted reconstruction"))
    orientation = getattr(headers[0], "ImageOrientationPatient", None)
    if orientation is not None:
        normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
        if abs(normal[2]) < 0.9:
            findings.append(("warning", "orientation", "not an axial acquisition (slice normal is not head–foot): a "
                                                       "reformat? prefer the original axial series"))
    kernel = " ".join(str(getattr(headers[0], "ConvolutionKernel", "")).upper().split())
    if any(k in kernel for k in LUNG_KERNELS):
        findings.append(("warning", "kernel", f"reconstruction kernel {kernel!r} is a sharp lung kernel; prefer the "
                                              f"soft-tissue (mediastinal) reconstruction of the same scan"))
    return findings


#: Slice spacing irregularity tolerated in a DICOM series, as a share of its median slice interval.
SLICE_TOLERANCE = 0.1


def slice_geometry_problems(path: Path) -> list[str]:
    """Geometry that resampling cannot repair, checked wherever a CT is read (issue 22): a DICOM series with a
    duplicated slice, a missing slice (a gap over 1.5 intervals), irregular ("jittered") slice positions (spread
    over 10 % of the interval), several series or a file that is not DICOM; a NIfTI whose affine is sheared
    (non-orthogonal axes). Returns the problems as sentences (empty when the geometry is sound)."""
    path = Path(path)
    if path.is_dir():
        import pydicom

        headers = []
        for f in sorted(x for x in path.iterdir() if x.is_file()):
            try:
                headers.append(pydicom.dcmread(f, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - pydicom raises several kinds for a non-DICOM file
                return [f"{f.name} in the series folder is not a DICOM file (a thumbnail or a report?); move it out"]
        if not headers:
            return []
        series = {str(getattr(h, "SeriesInstanceUID", "")) for h in headers}
        if len(series) > 1:
            return [f"{len(series)} series in one folder; put each series in its own folder and point ct_path at the "
                    f"non-contrast chest series"]
        try:
            orientation = np.asarray(headers[0].ImageOrientationPatient, float)
            normal = np.cross(orientation[:3], orientation[3:])
            depth = np.sort([float(np.dot(np.asarray(h.ImagePositionPatient, float), normal)) for h in headers])
        except AttributeError:
            return []  # no positions: MONAI's reader orders by instance number; nothing to check here
        steps = np.diff(depth)
        if len(steps) < 2:
            return []
        median = float(np.median(steps))
        if median <= 0:
            return ["slice positions do not advance (every slice at one position)"]
        problems = []
        if steps.min() < SLICE_TOLERANCE * median:
            problems.append(f"a duplicated slice (two slices {steps.min():.2f} mm apart; interval {median:.2f} mm)")
        if steps.max() > 1.5 * median:
            problems.append(f"a missing slice (a {steps.max():.2f} mm gap in a {median:.2f} mm series)")
        regular = steps[(steps >= SLICE_TOLERANCE * median) & (steps <= 1.5 * median)]
        if len(regular) > 1 and float(regular.std()) > SLICE_TOLERANCE * median:
            problems.append(f"irregular slice positions (interval {median:.2f} ± {regular.std():.2f} mm)")
        return [p + "; re-export the complete series" for p in problems]
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel as nib

        axes = np.asarray(nib.load(str(path)).affine, float)[:3, :3]
        unit = axes / np.linalg.norm(axes, axis=0, keepdims=True).clip(1e-12)
        cosines = np.abs(unit.T @ unit - np.eye(3))
        if cosines.max() > 1e-3:
            return [f"sheared affine (axes {np.degrees(np.arccos(1 - cosines.max())):.1f}° from orthogonal); "
                    f"resample it to an orthogonal grid first"]
    return []


def heart_centre(volume_hu: np.ndarray, spacing_mm: tuple[float, float, float], mask: np.ndarray | None = None) -> tuple:
    """The heart's centre in voxel coordinates of ``volume_hu`` (RAS): the centroid of ``mask`` when given, else the
    heuristic of the module docstring. Falls back to the volume's centre when no mediastinum is found."""
    if mask is not None:
        idx = np.argwhere(np.asarray(mask) > 0)
        if len(idx):
            return tuple(float(v) for v in idx.mean(axis=0))
    vol, small = _downsample(np.asarray(volume_hu, dtype=np.float32), tuple(float(s) for s in spacing_mm))
    step = [b / a for a, b in zip(spacing_mm, small)]
    inner_air, soft = _anatomy(vol)
    mediastinum = _mediastinum(inner_air, soft & (vol < 200.0))  # soft tissue and blood, not bone
    if not mediastinum.any():
        return tuple((s - 1) / 2.0 for s in volume_hu.shape)
    ys = np.nonzero(inner_air)[1]
    mediastinum[:, : int(np.percentile(ys, 40)), :] = False  # the heart lies anterior to the spine
    area = mediastinum.sum(axis=(0, 1)).astype(float)  # the heart is where the mediastinum is widest
    if area.max() <= 0:
        return tuple((s - 1) / 2.0 for s in volume_hu.shape)
    slices = area >= 0.5 * area.max()
    chosen = mediastinum & slices[None, None, :]
    centre = np.argwhere(chosen).mean(axis=0)
    return tuple(float(c * k) for c, k in zip(centre, step))
