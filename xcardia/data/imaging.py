"""CT loading and preprocessing with MONAI — one pipeline for training, evaluation and notebooks — and a disk cache.

Pipeline (:func:`preprocess_ct`): read (NIfTI via nibabel, a DICOM series folder via pydicom, or the paper's
``.npy`` volumes with an explicit spacing) → sanity checks → reorient to RAS → anti-alias when downsampling →
resample to the target spacing → clip and scale HU → centre crop/pad to the target shape.

Default intensity window: −200 to 400 HU scaled to [−1, 1] (clipped). It keeps fat (≈ −100), soft tissue and
blood (≈ 40) far apart and saturates lung below and calcium above, which stays the brightest value.

The cache (:class:`PreprocessCache`) keys each volume by its path, size, modification time and every parameter of
the pipeline; a second pass reads no original file, a changed parameter or file invalidates the entry, and writes
are atomic (temporary file, then rename), so two processes may build it at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from xcardia.atomic import write_atomic, write_text_atomic
from xcardia.errors import XcardiaError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# MONAI logs a warning whenever it builds its DICOM reader on a machine without the optional GPU codec; pydicom
# decodes instead, so the message is noise for CPU users.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@dataclass(frozen=True)
class PreprocessSpec:
    """Target geometry and intensity scaling.

    Attributes:
        shape: output voxels (X, Y, Z), RAS order.
        spacing_mm: output isotropic spacing.
        hu_window: (low, high) HU mapped to [−1, 1]; values outside are clipped.
        npy_spacing_mm: voxel spacing of ``.npy`` volumes (they carry no geometry; axes are taken as RAS).
        min_air_hu: a CT whose lowest value is above this has no air in it: it looks unrescaled.
        centre: where a field of view larger than the target is cropped: ``image`` (its centre) or ``heart`` (the
            heart mask's centroid, else the heuristic of :func:`xcardia.data.qc.heart_centre`). A volume already
            within the target field of view (the synthetic cohort) is never moved.
    """

    shape: tuple[int, int, int] = (32, 32, 32)
    spacing_mm: float = 6.0
    hu_window: tuple[float, float] = (-200.0, 400.0)
    npy_spacing_mm: float | None = None
    min_air_hu: float = -500.0
    centre: str = "image"
    series_qc: bool = True

    def key(self) -> dict:
        d = asdict(self)
        if d["centre"] == "image":
            del d["centre"]  # the default: keys (caches, run configs) as before the option existed
        if d["series_qc"]:
            del d["series_qc"]
        d["shape"] = list(self.shape)
        d["hu_window"] = list(self.hu_window)
        return d


def _kind(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(".npy"):
        return "npy"
    if name.endswith(".dcm"):
        raise XcardiaError(f"{path}: a single DICOM file; point ct_path at the folder that holds the whole series")
    raise XcardiaError(f"{path}: unknown image format; use a NIfTI file (.nii/.nii.gz), a DICOM series folder or .npy")


def nifti_geometry_problem(path: Path, img) -> None:
    """Refuse a NIfTI whose geometry is ambiguous or impossible: a voxel size of zero or below in the header, or a
    qform and an sform that both claim validity and disagree (readers differ on which to use, so the same file could
    be resampled two ways — its risk would depend on the reader).

    Raises:
        XcardiaError: naming the file and what to fix.
    """
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as handle:  # the header as written: nibabel's checks replace a 0 pixdim by 1 on load
        raw = type(img.header).from_fileobj(handle, check=False)
    zooms = [float(z) for z in raw["pixdim"][1:4]]
    if any(not z > 0 for z in zooms):
        raise XcardiaError(f"{path}: the header's voxel size {tuple(zooms)} has a zero or negative entry (pixdim); "
                           f"fix the header's pixdim — the spacing cannot be guessed")
    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    if qcode > 0 and scode > 0:
        qform, sform = header.get_qform(), header.get_sform()
        if not np.allclose(qform, sform, atol=1e-3):
            worst = float(np.abs(qform - sform).max())
            raise XcardiaError(f"{path}: the header's qform and sform disagree (up to {worst:.3g} mm); readers differ on "
                               f"which to use — rewrite the file with one orientation (e.g. set the sform from the "
                               f"qform) and screen it again")


def read_header(path: str | os.PathLike) -> dict:
    """Cheap readability check: the shape and spacing from the header only (no voxel data).

    Raises:
        XcardiaError: missing or unreadable file, or an image that is not 3-D.
    """
    p = Path(path)
    if not p.exists():
        if p.is_symlink():
            raise XcardiaError(f"{p} is a symbolic link that leads nowhere (a loop or a dangling link); point "
                               f"ct_path at the image itself")
        raise XcardiaError(f"{p} does not exist")
    if not (p.is_file() or p.is_dir()):  # a FIFO or a device would block or never end
        raise XcardiaError(f"{p} is not a regular file or a DICOM folder (a pipe or a device?); point ct_path at "
                           f"the image file")
    kind = _kind(p)
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(p))
            shape, zooms = img.shape, img.header.get_zooms()
            nifti_geometry_problem(p, img)
        elif kind == "npy":
            arr = np.load(p, mmap_mode="r")
            shape, zooms = arr.shape, ()
        else:
            import pydicom

            files = sorted(f for f in p.iterdir() if f.is_file())
            if not files:
                subfolders = sorted(f.name for f in p.iterdir() if f.is_dir())
                if subfolders:
                    raise XcardiaError(f"{p}: holds no files, only the subfolder(s) {', '.join(subfolders[:3])}; "
                                       f"point ct_path at the folder that holds the series' .dcm files")
                raise XcardiaError(f"{p}: the DICOM folder is empty")
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            shape = (int(ds.Rows), int(ds.Columns), len(files))
            zooms = tuple(float(v) for v in getattr(ds, "PixelSpacing", ())) + (float(getattr(ds, "SliceThickness", 0) or 0),)
    except XcardiaError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear message
        raise XcardiaError(f"{p}: cannot read the {kind} header ({type(exc).__name__}: {exc}); "
                           f"check that the file is complete and not corrupt") from None
    squeezed = [s for s in shape if s != 1]
    if len(squeezed) != 3:
        raise XcardiaError(f"{p}: image has shape {tuple(shape)}; a CT volume must be 3-D (one channel, one time point)")
    return {"kind": kind, "shape": tuple(int(s) for s in shape), "spacing": tuple(float(z) for z in zooms[:3])}


#: Plausible CT voxel spacing per axis (mm): below, a micro-CT or a header error; above, a scout or a header in cm.
SPACING_RANGE_MM = (0.2, 10.0)
#: Fewer slices than this along any axis is a localizer/scout or a fragment, not a chest CT series.
MIN_SLICES = 16
#: The resampled volume is refused above this many voxels before anything is allocated (512³).
MAX_RESAMPLED_VOXELS = 512**3


def geometry_problems(shape, spacing, spec: PreprocessSpec) -> list[tuple[str, str]]:
    """``(severity, message)`` for a CT's geometry against the target: spacing outside the plausible range, too few
    slices, a resampled size that cannot be allocated (errors), a field of view that leaves the target mostly
    padding (warning). ``shape``/``spacing`` are per axis (spacing may be empty for ``.npy`` without one)."""
    out = []
    shape = [int(s) for s in shape if int(s) != 1][:3]
    if shape and min(shape) < MIN_SLICES:
        out.append(("error", f"only {min(shape)} voxels along one axis (shape {tuple(shape)}): a localizer/scout or "
                             f"a partial series; export the full axial series (≥ {MIN_SLICES} slices)"))
    spacing = [abs(float(z)) for z in spacing][:3]
    if len(spacing) != 3 or not shape:
        return out
    lo, hi = SPACING_RANGE_MM
    if any(not (lo <= z <= hi) for z in spacing):
        out.append(("error", f"voxel spacing {tuple(round(z, 4) for z in spacing)} mm is outside {lo:g}–{hi:g} mm per "
                             f"axis; the header is wrong (mm vs cm?) or this is not a clinical CT"))
        return out
    resampled = np.prod([n * z / spec.spacing_mm for n, z in zip(shape, spacing)])
    if resampled > MAX_RESAMPLED_VOXELS:
        out.append(("error", f"resampling to {spec.spacing_mm:g} mm would make {resampled:.3g} voxels (limit "
                             f"{MAX_RESAMPLED_VOXELS:.3g}); check the spacing in the header"))
    covered = np.prod([min(n * z, t * spec.spacing_mm) for n, z, t in zip(shape, spacing, spec.shape)])
    target = np.prod([t * spec.spacing_mm for t in spec.shape])
    if covered < 0.5 * target:
        out.append(("warning", f"the scan covers {100 * covered / target:.0f} % of the {spec.shape} × "
                               f"{spec.spacing_mm:g} mm target field of view; the rest is padding"))
    return out


def load_ct(path: str | os.PathLike, spec: PreprocessSpec):
    """Read a CT as a MONAI ``MetaTensor`` (1, X, Y, Z) in HU with its affine, and check it.

    Raises:
        XcardiaError: unreadable, not 3-D, NaN voxels, constant, or apparently not in HU.
    """
    from monai.data import MetaTensor
    from monai.transforms import LoadImage

    from xcardia.data.qc import slice_geometry_problems

    p = Path(path)
    header = read_header(p)
    kind = header["kind"]
    geometry = slice_geometry_problems(p)
    if geometry:
        raise XcardiaError(f"{p}: {geometry[0]}")
    spacing = header["spacing"] if kind != "npy" else ((spec.npy_spacing_mm,) * 3 if spec.npy_spacing_mm else ())
    for severity, message in geometry_problems(header["shape"], spacing, spec):
        if severity == "error":
            raise XcardiaError(f"{p}: {message}")
    try:
        if kind == "npy":
            if spec.npy_spacing_mm is None:
                raise XcardiaError(f"{p}: a .npy volume carries no voxel spacing; add a manifest column "
                                   f"npy_spacing_mm with its voxel size in mm (the paper's volumes are 2 mm)")
            arr = np.load(p).astype(np.float32)
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            if arr.ndim != 3:
                raise XcardiaError(f"{p}: .npy volume has shape {arr.shape}; expected (X, Y, Z) or (1, X, Y, Z)")
            affine = np.diag([spec.npy_spacing_mm] * 3 + [1.0])
            img = MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))
        else:
            reader = "NibabelReader" if kind == "nifti" else "PydicomReader"
            with warnings.catch_warnings():  # optional GPU DICOM codecs are absent on CPU machines; pydicom decodes
                warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
                img = LoadImage(image_only=True, ensure_channel_first=True, reader=reader)(str(p))
    except XcardiaError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise XcardiaError(f"{p}: cannot read the image ({type(exc).__name__}: {exc}); "
                           f"check that the file is complete and not corrupt") from None
    check_ct_values(img, p, spec)
    return img


def check_ct_values(img, path: Path, spec: PreprocessSpec) -> None:
    """Refuse volumes a model must never silently train on."""
    if img.ndim != 4 or img.shape[0] != 1:
        raise XcardiaError(f"{path}: image has shape {tuple(img.shape[1:])} with {img.shape[0]} channel(s); "
                           f"a CT must be one 3-D volume")
    values = img.as_tensor() if hasattr(img, "as_tensor") else img
    if torch.isnan(values).any():
        n = int(torch.isnan(values).sum())
        raise XcardiaError(f"{path}: {n} NaN voxel(s); fix or exclude this scan (NaNs are never replaced by zeros)")
    lo, hi = float(values.min()), float(values.max())
    if lo == hi:
        raise XcardiaError(f"{path}: every voxel is {lo:g}; the volume is empty or corrupt")
    if lo > spec.min_air_hu:
        raise XcardiaError(f"{path}: lowest value {lo:g} — no air near −1000 HU, so the image looks unrescaled; "
                           f"apply RescaleSlope/RescaleIntercept (DICOM) or the NIfTI scl_slope/scl_inter to get HU")


_RAS = (("L", "R"), ("P", "A"), ("I", "S"))


def load_ras(path: str | os.PathLike, spec: PreprocessSpec):
    """The CT in HU (after :func:`load_ct`'s checks), reoriented to RAS, at its own spacing."""
    from monai.transforms import Orientation

    return Orientation(axcodes="RAS", labels=_RAS)(load_ct(path, spec))


def _resampled(path: str | os.PathLike, spec: PreprocessSpec, loaded=None):
    """The CT in HU, RAS, at the target spacing (anti-aliased), after the checks and the series QC. ``loaded``: the
    CT as :func:`load_ras` gave it, whose series QC the caller has already judged (screening reads a CT once)."""
    from monai.transforms import GaussianSmooth, Spacing

    from xcardia.data.qc import series_qc

    img = load_ras(path, spec) if loaded is None else loaded
    current = np.abs(np.asarray(img.pixdim, dtype=float))
    findings = series_qc(img.as_tensor().numpy()[0], tuple(current)) if (spec.series_qc and loaded is None) else ()
    for severity, _check, message in findings:
        if severity == "error":
            raise XcardiaError(f"{path}: {message}")
    target = float(spec.spacing_mm)
    sigma = np.maximum((target / current - 1.0) / 2.0, 0.0)  # anti-aliasing before downsampling
    if np.any(sigma > 0.25):
        img = GaussianSmooth(sigma=tuple(float(s) for s in sigma))(img)
    if not np.allclose(current, target, rtol=1e-3):
        img = Spacing(pixdim=(target,) * 3, mode="bilinear", padding_mode="border")(img)
    return img


def _resampled_mask(heart_mask: str | os.PathLike, spec: PreprocessSpec, shape, ct: str | os.PathLike):
    """A binary mask in the CT's space on the same RAS grid as :func:`_resampled` (nearest neighbour)."""
    from monai.transforms import LoadImage, Orientation, Spacing

    m = LoadImage(image_only=True, ensure_channel_first=True)(str(heart_mask))
    m = Orientation(axcodes="RAS", labels=_RAS)(m)
    if not np.allclose(np.abs(np.asarray(m.pixdim, dtype=float)), float(spec.spacing_mm), rtol=1e-3):
        m = Spacing(pixdim=(float(spec.spacing_mm),) * 3, mode="nearest")(m)
    mask = m.as_tensor().numpy()[0] > 0
    if mask.shape != tuple(shape) or not mask.any():
        raise XcardiaError(f"{heart_mask}: the heart mask is empty or not in the space of {ct} "
                           f"({mask.shape} vs {tuple(shape)} voxels after resampling)")
    return mask


def crop_centre(img, spec: PreprocessSpec, heart_mask: str | os.PathLike | None = None, ct=None):
    """Where the target box is centred on a resampled CT: None (the image centre) unless ``spec.centre == "heart"``
    and the CT is larger than the target; then the heart mask's centroid or the heuristic's heart centre."""
    from xcardia.data.qc import heart_centre

    shape = tuple(img.shape[1:])
    if spec.centre != "heart" or not any(n > t for n, t in zip(shape, spec.shape)):
        return None
    mask = _resampled_mask(heart_mask, spec, shape, ct) if heart_mask is not None else None
    return tuple(int(round(c)) for c in heart_centre(img.as_tensor().numpy()[0], (float(spec.spacing_mm),) * 3, mask))


def _to_target(img, spec: PreprocessSpec, centre, pad_value: float):
    from monai.transforms import ResizeWithPadOrCrop, SpatialCrop

    if centre is not None:
        img = SpatialCrop(roi_center=list(centre), roi_size=spec.shape)(img)
    return ResizeWithPadOrCrop(spatial_size=spec.shape, mode="constant", constant_values=pad_value)(img)


def preprocess_ct(path: str | os.PathLike, spec: PreprocessSpec, heart_mask: str | os.PathLike | None = None,
                  loaded=None) -> np.ndarray:
    """Load and preprocess one CT: a float32 array of ``spec.shape`` in [−1, 1] (RAS, ``spec.spacing_mm``).

    The series must pass :func:`xcardia.data.qc.series_qc` (a scan without lungs is refused). With
    ``spec.centre == "heart"`` a field of view larger than the target is cropped around the heart (``heart_mask``'s
    centroid, e.g. TotalSegmentator's ``heart.nii.gz`` in the CT's space, or the heuristic). ``loaded``: the CT
    already read by :func:`load_ras` and judged by the caller's series QC (it is then not read or judged again)."""
    from monai.transforms import ScaleIntensityRange

    img = _resampled(path, spec, loaded)
    centre = crop_centre(img, spec, heart_mask, path)
    lo, hi = spec.hu_window
    img = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=-1.0, b_max=1.0, clip=True)(img)
    img = _to_target(img, spec, centre, -1.0)
    return np.ascontiguousarray(img.as_tensor().numpy()[0], dtype=np.float32)


def preprocess_mask(ct: str | os.PathLike, mask: str | os.PathLike, spec: PreprocessSpec,
                    heart_mask: str | os.PathLike | None = None) -> np.ndarray:
    """A binary mask (any structure, in the CT's space) brought onto exactly the voxels :func:`preprocess_ct` gives
    for ``ct``: same reorientation, spacing and crop (nearest neighbour). Saliency inside the heart of a real CT
    uses it with the cohort's heart masks."""
    img = _resampled(ct, spec)
    centre = crop_centre(img, spec, heart_mask, ct)
    resampled = _resampled_mask(mask, spec, tuple(img.shape[1:]), ct)
    from monai.data import MetaTensor

    out = _to_target(MetaTensor(torch.from_numpy(resampled.astype(np.float32))[None]), spec, centre, 0.0)
    return out.as_tensor().numpy()[0] > 0.5


def crop_preview(ct: str | os.PathLike, spec: PreprocessSpec, heart_mask: str | os.PathLike | None = None) -> dict:
    """What the encoder sees of a real CT: the resampled volume in HU and the target box (voxel ranges per axis, on
    that volume) that preprocessing keeps — for notebook 01's crop figure."""
    img = _resampled(ct, spec)
    volume = img.as_tensor().numpy()[0]
    centre = crop_centre(img, spec, heart_mask, ct) or tuple(s // 2 for s in volume.shape)
    box = tuple((int(c - t // 2), int(c - t // 2 + t)) for c, t in zip(centre, spec.shape))
    return {"volume": volume, "box": box, "centre": centre}


class PreprocessCache:
    """Preprocessed volumes on disk, keyed by file identity and pipeline parameters.

    Args:
        root: cache folder (created on demand).
        spec: the preprocessing parameters; part of every key.
    """

    def __init__(self, root: str | os.PathLike, spec: PreprocessSpec):
        self.root = Path(root)
        self.spec = spec

    def key(self, path: str | os.PathLike, heart_mask: str | os.PathLike | None = None) -> str:
        p = Path(path).resolve()
        if p.is_dir():  # a DICOM series: the names, sizes and times of its files
            stat = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(p.iterdir()) if f.is_file()]
        else:
            s = p.stat()
            stat = [(p.name, s.st_size, s.st_mtime_ns)]
        # pipeline 2: entries carry a checksum sidecar (issue 22); entries of pipeline 1 are not reused
        blob = {"path": str(p), "files": stat, "spec": self.spec.key(), "pipeline": 2}
        if self.spec.centre != "image":
            blob["centre"] = self.spec.centre
            if heart_mask is not None and Path(heart_mask).exists():
                m = Path(heart_mask).resolve()
                blob["heart_mask"] = [str(m), m.stat().st_size, m.stat().st_mtime_ns]
        blob = json.dumps(blob, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def entry(self, path: str | os.PathLike, heart_mask: str | os.PathLike | None = None) -> Path:
        k = self.key(path, heart_mask)
        return self.root / k[:2] / f"{k}.npy"

    def load(self, path: str | os.PathLike, npy_spacing_mm: float | None = None,
             heart_mask: str | os.PathLike | None = None) -> np.ndarray:
        """The preprocessed volume, from the cache or computed and stored (atomically). ``npy_spacing_mm`` (the
        manifest's ``npy_spacing_mm`` cell) gives a ``.npy`` volume its voxel size; ``heart_mask`` (the
        ``heart_mask_path`` cell) centres a heart crop. Both are part of the cache key.

        Every entry has a sidecar ``<key>.json`` written after it: the source file's identity and the entry's shape
        and sha256. An entry that does not match it — overwritten, truncated, NaN, the wrong shape, another
        patient's tensor, or written without a sidecar — is never used: it is rebuilt from the CT, with a log line
        (issue 22)."""
        p = Path(path)
        if not p.exists():
            raise XcardiaError(f"{p} does not exist")
        cache = self if npy_spacing_mm is None else PreprocessCache(self.root, replace(self.spec, npy_spacing_mm=npy_spacing_mm))
        entry = cache.entry(p, heart_mask)
        if entry.exists():
            array, problem = _verified_entry(entry, cache.spec.shape, str(p.resolve()))
            if problem is None:
                return array
            print(f"[cache] {entry}: {problem}; rebuilding it from {p}", file=sys.stderr)
        if heart_mask is not None and not Path(heart_mask).exists():
            raise XcardiaError(f"heart mask {heart_mask} does not exist (manifest column heart_mask_path)")
        array = preprocess_ct(p, cache.spec, heart_mask)
        if not np.isfinite(array).all():
            raise XcardiaError(f"{p}: preprocessing gave non-finite voxels (±inf in the image?); fix the file")
        write_atomic(entry, lambda tmp: np.save(tmp, array), suffix=".npy")
        write_text_atomic(entry.with_suffix(".json"), json.dumps(
            {"source": str(p.resolve()), "shape": list(array.shape), "sha256": _array_sha256(array)}) + "\n")
        return array


def _array_sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _verified_entry(entry: Path, shape, source: str) -> tuple[np.ndarray | None, str | None]:
    """``(array, None)`` when a cache entry matches its sidecar, else ``(None, what is wrong)``."""
    sidecar = entry.with_suffix(".json")
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None, "no valid checksum record beside the entry"
    try:
        array = np.load(entry)
    except Exception as exc:  # noqa: BLE001 - truncated or not an array
        return None, f"unreadable ({type(exc).__name__})"
    if tuple(array.shape) != tuple(shape) or list(array.shape) != record.get("shape"):
        return None, f"shape {tuple(array.shape)} instead of {tuple(shape)}"
    if record.get("source") != source:
        return None, f"recorded for {record.get('source')}, not this CT"
    if not np.isfinite(array).all():
        return None, "non-finite voxels"
    if _array_sha256(array) != record.get("sha256"):
        return None, "its contents changed since it was written (checksum mismatch)"
    return array, None
