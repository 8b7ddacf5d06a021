"""Render a non-contrast, non-gated chest CT (HU) and its structure label map from a patient's :class:`Anatomy`.

Shapes are signed-distance functions (SDFs, mm) painted in anatomical order with soft, partial-volume
occupancy ``α = clip(0.5 − d/voxel, 0, 1)``, so sub-voxel changes of wall thickness or chamber size still change
voxel values — as partial-volume effects do in real CT. The heart is assembled from ellipsoidal chambers at the
patient's cardiac phase inside an epicardial fat layer, an optional effusion rim and the pericardium.

Attenuation values (non-contrast): air −1000; lung ≈ −850 with texture and a dependent gradient; fat ≈ −100
(epicardial ≈ −110); muscle ≈ 45; myocardium 45–55; blood 3·Hb + 3 (≈ 40, so chambers are barely visible); liver
≈ 55; pericardial fluid 0–15; bone 250–700; calcium ≥ 130 HU (the Agatston threshold). Noise is spatially
correlated Gaussian noise whose SD (10–40 HU) grows with body size and is higher for low-dose protocols.
Sources are listed in ``data_cards/synthetic_cohort.md``.

Randomness here (position, heart axis, lesion sites, noise) comes from the stream
``default_rng([seed, index, 1])``, separate from the physiology stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from xcardia.cohort.physiology import Anatomy
from xcardia.errors import XcardiaError

#: Structure label map values. "Heart" in analyses is the union of LV/other myocardium and the four cavities.
STRUCTURES: dict[str, int] = {
    "background": 0,
    "fat": 1,
    "lung": 2,
    "bone": 3,
    "aorta": 4,
    "pulmonary_artery": 5,
    "epicardial_fat": 6,
    "effusion": 7,
    "lv_myocardium": 8,
    "lv_cavity": 9,
    "rv_cavity": 10,
    "la_cavity": 11,
    "ra_cavity": 12,
    "other_myocardium": 13,
    "coronary_calcium": 14,
    "valve_calcium": 15,
    "abdomen": 16,
    "muscle": 17,
}
HEART_LABELS: tuple[int, ...] = (8, 9, 10, 11, 12, 13)
CALCIUM_HU_THRESHOLD = 130.0
BLUR_REACH_MM = 12.0  # cardiac motion blurs the image out to this distance beyond the pericardium

AIR_HU = -1000.0
FAT_HU = -100.0
EPICARDIAL_FAT_HU = -110.0
MUSCLE_HU = 45.0
LUNG_HU = -855.0
LIVER_HU = 55.0
PERICARDIUM_HU = 35.0
CANCELLOUS_HU = 230.0
CORTICAL_HU = 650.0
RIB_HU = 450.0
MEDIASTINAL_FAT_HU = FAT_HU + 10.0
PARACARDIAL_FAT_HU = FAT_HU + 5.0
DISC_HU = 90.0  # intervertebral disc
SPINOUS_PROCESS_HU = CORTICAL_HU * 0.7
STERNUM_HU = 380.0
EFFUSION_HU_MEAN_SD = (8.0, 4.0)  # transudate, non-contrast
EFFUSION_HU_RANGE = (0.0, 15.0)
CALCIUM_LESION_HU_RANGE = (400.0, 1000.0)  # a lesion's peak attenuation, before partial volume and noise
PERICARDIUM_MM = 1.5
LUNG_TEXTURE_SD_HU = 35.0  # parenchymal texture (vessels, septa) at ≈3 mm scale
LUNG_TEXTURE_SCALE_MM = 3.0
LUNG_DEPENDENT_HU_PER_MM = 0.25  # denser posteriorly: +0.25 HU per mm towards the back
NOISE_CORRELATION_MM = 0.9


@dataclass(frozen=True)
class RenderSpec:
    """Image geometry. ``field_of_view`` is ``chest`` (the paper: thorax-centred) or ``heart`` (heart-centred)."""

    shape: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: float = 5.0
    field_of_view: str = "heart"

    def __post_init__(self):
        if self.field_of_view not in ("chest", "heart"):
            raise XcardiaError(f"field_of_view must be 'chest' or 'heart', got {self.field_of_view!r}")
        if min(self.shape) < 16:
            raise XcardiaError(f"shape {self.shape} is too small: every dimension must be at least 16 voxels")
        if not self.spacing_mm > 0:
            raise XcardiaError(f"spacing_mm must be positive, got {self.spacing_mm}")


@dataclass
class RenderedCT:
    """A rendered CT: int16 HU array, uint8 label map, the RAS affine (mm) and measured render facts."""

    hu: np.ndarray
    labelmap: np.ndarray
    affine: np.ndarray
    facts: dict[str, float]


# ----------------------------------------------------------------------------------------------- signed distances
def sdf_ellipsoid(x, y, z, a: float, b: float, c: float):
    """Approximate signed distance (mm) to an axis-aligned ellipsoid with semi-axes a, b, c (Quilez bound).

    d = k0·(k0 − 1)/k1 with k0 = |p/r|, k1 = |p/r²|; k0/k1 ≥ min(r) everywhere, which also fixes the centre.
    """
    xa, yb, zc = x * np.float32(1.0 / a), y * np.float32(1.0 / b), z * np.float32(1.0 / c)
    k0 = xa * xa
    k0 = k0 + yb * yb
    k0 += zc * zc
    np.sqrt(k0, out=k0)
    xa *= np.float32(1.0 / a)
    yb *= np.float32(1.0 / b)
    zc *= np.float32(1.0 / c)
    k1 = xa * xa
    k1 = k1 + yb * yb
    k1 += zc * zc
    np.sqrt(k1, out=k1)
    k1 += np.float32(1e-12)
    ratio = np.divide(k0, k1, out=k1)
    np.maximum(ratio, np.float32(min(a, b, c)), out=ratio)
    k0 -= np.float32(1.0)
    k0 *= ratio
    return k0


def sdf_ellipse(x, y, a: float, b: float):
    """Approximate signed distance (mm) to an axis-aligned ellipse (2-D) with semi-axes a, b."""
    k0 = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    k1 = np.sqrt((x / (a * a)) ** 2 + (y / (b * b)) ** 2) + np.float32(1e-12)
    return (k0 - 1.0) * np.maximum(k0 / k1, np.float32(min(a, b)))


def sdf_capsule(px, py, pz, a, b, radius: float):
    """Signed distance (mm) to a capsule: the segment a→b thickened by ``radius``."""
    ab = np.asarray(b, dtype=np.float32) - np.asarray(a, dtype=np.float32)
    apx, apy, apz = px - a[0], py - a[1], pz - a[2]
    t = np.clip((apx * ab[0] + apy * ab[1] + apz * ab[2]) / float(ab @ ab), 0.0, 1.0)
    return np.sqrt((apx - t * ab[0]) ** 2 + (apy - t * ab[1]) ** 2 + (apz - t * ab[2]) ** 2) - radius


def smooth_min(a, b, k: float):
    """Polynomial smooth minimum: a union of two SDFs that fills the grooves between them over width ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix (radians about x, then y, then z)."""
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _gaussian_noise_gain(sigma_vox: float, truncate: float = 4.0) -> float:
    """SD of white unit noise after scipy's 3-D Gaussian filter with ``sigma_vox`` (to rescale it to unit SD)."""
    if sigma_vox <= 0:
        return 1.0
    radius = int(truncate * sigma_vox + 0.5)
    x = np.arange(-radius, radius + 1)
    w = np.exp(-0.5 * (x / sigma_vox) ** 2)
    w /= w.sum()
    return float(np.sqrt(np.sum(w**2)) ** 3)


# ----------------------------------------------------------------------------------------------- the canvas
class _Canvas:
    """HU image and label map on a world grid; paints SDF shapes with partial-volume occupancy."""

    def __init__(self, shape, spacing: float, origin: np.ndarray, patient_rotation_z: float):
        self.shape = shape
        self.spacing = spacing
        self.origin = origin
        self.hu = np.full(shape, AIR_HU, dtype=np.float32)
        self.lab = np.zeros(shape, dtype=np.uint8)
        # world coordinates of voxel centres, then patient (anatomy) coordinates: rotation about z only
        wx = (origin[0] + spacing * np.arange(shape[0])).astype(np.float32)
        wy = (origin[1] + spacing * np.arange(shape[1])).astype(np.float32)
        self.z = (origin[2] + spacing * np.arange(shape[2])).astype(np.float32)
        c, s = math.cos(patient_rotation_z), math.sin(patient_rotation_z)
        gx, gy = wx[:, None], wy[None, :]
        self.x2 = (c * gx + s * gy).astype(np.float32)  # anatomy x of each (i, j)
        self.y2 = (-s * gx + c * gy).astype(np.float32)
        self.rotation_z = patient_rotation_z

    def box(self, centre, radius):
        """Index slices of the voxels whose anatomy coordinates may lie within ``radius`` (mm, scalar or per
        axis) of ``centre``; None when the box misses the image."""
        half = np.broadcast_to(np.asarray(radius, dtype=float), (3,))
        c, s = math.cos(self.rotation_z), math.sin(self.rotation_z)
        world = (c * centre[0] - s * centre[1], s * centre[0] + c * centre[1], centre[2])  # anatomy → world
        half_world = (abs(c) * half[0] + abs(s) * half[1], abs(s) * half[0] + abs(c) * half[1], half[2])
        out = []
        for axis in range(3):
            lo = int(math.floor((world[axis] - half_world[axis] - self.origin[axis]) / self.spacing))
            hi = int(math.ceil((world[axis] + half_world[axis] - self.origin[axis]) / self.spacing)) + 1
            lo, hi = max(lo, 0), min(hi, self.shape[axis])
            if hi <= lo:
                return None
            out.append(slice(lo, hi))
        return tuple(out)

    def coords(self, sl):
        """Anatomy coordinates (x, y broadcast 2-D; z 1-D) of a box, shaped to broadcast to 3-D."""
        return self.x2[sl[0], sl[1]][:, :, None], self.y2[sl[0], sl[1]][:, :, None], self.z[sl[2]][None, None, :]

    def paint(self, sl, distance, hu, label: int | None):
        """Blend ``hu`` into the box ``sl`` with occupancy α = clip(0.5 − d/voxel, 0, 1); label where α ≥ ½.
        ``distance`` and ``hu`` may be lower-dimensional (broadcast), which keeps z-invariant shapes cheap."""
        alpha = np.clip(np.float32(0.5) - distance * np.float32(1.0 / self.spacing), 0.0, 1.0).astype(np.float32)
        region = self.hu[sl]
        change = np.subtract(np.asarray(hu, dtype=np.float32), region)
        change *= alpha
        region += change
        if label is not None:
            np.copyto(self.lab[sl], np.uint8(label), where=np.broadcast_to(alpha >= 0.5, region.shape))
        return np.broadcast_to(alpha, region.shape)


# ----------------------------------------------------------------------------------------------- the heart
@dataclass
class _HeartLayout:
    centre: np.ndarray  # world (anatomy) position of the LV cavity centre
    basis: np.ndarray  # 3×3, columns e1 (base→apex), e2 (towards RV), e3
    shapes: dict[str, tuple[np.ndarray, tuple[float, float, float]]]  # heart-frame centre, semi-axes (mm)
    walls: dict[str, float]
    fat_mm: float

    def bounds(self, margin: float) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box (anatomy coordinates) of all chambers, grown by ``margin`` mm."""
        lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
        for centre, axes in self.shapes.values():
            world = self.centre + self.basis @ centre
            # half-extents of the rotated ellipsoid (grown by the thickest wall) along the anatomical axes
            half = np.sqrt(((self.basis * (np.asarray(axes) + max(self.walls.values()))) ** 2).sum(axis=1)) + margin
            lo, hi = np.minimum(lo, world - half), np.maximum(hi, world + half)
        return lo, hi


def _ellipsoid_radius_for_volume(volume_ml: float, ratios: tuple[float, float, float]) -> float:
    """Scale r such that the ellipsoid (ratios·r) has ``volume_ml``."""
    v = volume_ml * 1000.0
    return (v / (4.0 / 3.0 * math.pi * ratios[0] * ratios[1] * ratios[2])) ** (1.0 / 3.0)


def _lv_wall_for_volume(r: float, h: float, myo_mm3: float) -> float:
    """Wall thickness t such that ellipsoid(h+0.8t, r+t, r+t) − ellipsoid(h, r, r) = ``myo_mm3`` (Newton)."""
    cavity = 4.0 / 3.0 * math.pi * h * r * r
    t = 8.0
    for _ in range(30):
        f = 4.0 / 3.0 * math.pi * (h + 0.8 * t) * (r + t) ** 2 - cavity - myo_mm3
        df = 4.0 / 3.0 * math.pi * (0.8 * (r + t) ** 2 + 2.0 * (h + 0.8 * t) * (r + t))
        t -= f / df
    return max(t, 1.0)


def _heart_layout(an: Anatomy, rng: np.random.Generator, thorax_w: float, thorax_d: float, dome_left: float):
    # LV: prolate ellipsoid whose short diameter is the Teichholz diameter of the current volume.
    r = an.lv_diameter_mm / 2.0
    h = an.lv_cavity_ml * 1000.0 / (4.0 / 3.0 * math.pi * r * r)
    h = float(np.clip(h, 1.15 * r, 3.0 * r))
    r = math.sqrt(an.lv_cavity_ml * 1000.0 / (4.0 / 3.0 * math.pi * h))
    t = _lv_wall_for_volume(r, h, an.lv_myocardial_ml * 1000.0)
    rv_r = _ellipsoid_radius_for_volume(an.rv_cavity_ml * 1.45, (1.6, 0.55, 1.0))  # overlap with LV is painted over
    la_r = _ellipsoid_radius_for_volume(an.la_cavity_ml, (0.85, 1.15, 1.0))
    ra_r = _ellipsoid_radius_for_volume(an.ra_cavity_ml, (1.1, 0.9, 1.0))
    ao_r = an.aorta_diameter_mm / 2.0 * 1.05
    rv_b = 0.55 * rv_r
    shapes = {
        "lv_cavity": (np.array([0.0, 0.0, 0.0]), (h, r, r)),
        "lv_outer": (np.array([0.0, 0.0, 0.0]), (h + 0.8 * t, r + t, r + t)),
        "rv": (np.array([-0.15 * h, r + t + 0.55 * rv_b, 0.15 * r]), (1.6 * rv_r, rv_b, 1.0 * rv_r)),
        "la": (np.array([-(h + t + 0.75 * la_r), -0.35 * r, 0.25 * r]), (0.85 * la_r, 1.15 * la_r, la_r)),
        "ra": (np.array([-(0.75 * h + t + 0.9 * ra_r), r + t + 0.6 * ra_r, -0.1 * r]), (1.1 * ra_r, 0.9 * ra_r, ra_r)),
        "aortic_root": (np.array([-(h + t + 2.0), 0.45 * r + 2.0, -0.55 * r]), (ao_r, ao_r, ao_r)),
    }
    # Orientation: long axis points anterior-inferior-left, jittered as between real patients (±12°).
    e1 = np.array([-0.62, 0.50, -0.50])
    e1 /= np.linalg.norm(e1)
    jitter = _rotation(*(np.radians(rng.normal(0.0, 7.0, size=3))))
    e1 = jitter @ e1
    toward_rv = np.array([0.75, 0.55, 0.1])
    e2 = toward_rv - (toward_rv @ e1) * e1
    e2 /= np.linalg.norm(e2)
    e3 = np.cross(e1, e2)
    basis = np.stack([e1, e2, e3], axis=1)
    # Heart volume and epicardial fat: the fat forms a layer of mean thickness V_fat / surface.
    heart_mm3 = 1000.0 * an.heart_volume_ml  # the one formula (physiology.Anatomy), at this phase
    surface = 4.84 * heart_mm3 ** (2.0 / 3.0) * 1.35
    fat_mm = float(np.clip(an.epicardial_fat_ml * 1000.0 / surface, 1.0, 12.0))
    # Position: the LV centre sits left, anterior, above the left hemidiaphragm.
    centre_heart_frame_to_world = np.array([-0.22 * thorax_w, 0.12 * thorax_d, 0.0]) + rng.normal(0.0, [7.0, 5.0, 0.0])
    centre = centre_heart_frame_to_world.copy()
    lowest = min(float((basis @ np.array([h + 0.8 * t, 0, 0]))[2]), -(r + t))
    centre[2] = dome_left - lowest + fat_mm + an.effusion_mm + 4.0 + rng.normal(0.0, 4.0)
    walls = {"lv": t, "rv": 3.5, "atria": 2.5}
    return _HeartLayout(centre=centre, basis=basis, shapes=shapes, walls=walls, fat_mm=fat_mm)


# ----------------------------------------------------------------------------------------------- scan framing
@dataclass(frozen=True)
class _Diaphragm:
    """Heights (mm) of the right and left hemidiaphragm domes; the left sits lower, under the heart."""

    right: float
    left: float


@dataclass(frozen=True)
class _FieldOfView:
    """Where the scanner put the image: its first voxel (world mm), in-plane patient rotation and target centre."""

    shape: tuple[int, int, int]
    origin: np.ndarray
    rotation_z: float
    centre: np.ndarray  # anatomy coordinates of the field-of-view centre
    world_heart: np.ndarray  # roughly the centre of all four chambers


def _diaphragm(rng: np.random.Generator) -> _Diaphragm:
    right = -30.0 + rng.normal(0.0, 8.0)
    return _Diaphragm(right=right, left=right - 15.0 + rng.normal(0.0, 5.0))


def _field_of_view(rng: np.random.Generator, spec: RenderSpec, heart: _HeartLayout) -> _FieldOfView:
    """Thorax-centred (the paper) or heart-centred (CPU profiles), with positioning jitter."""
    sp = float(spec.spacing_mm)
    world_heart = heart.centre + heart.basis @ np.array([-10.0, 8.0, 0.0])
    rot_z = math.radians(rng.normal(0.0, 3.0))
    if spec.field_of_view == "chest":
        centre = np.array([rng.normal(0, 10.0), rng.normal(-5.0, 8.0), world_heart[2] + 15.0 + rng.normal(0, 12.0)])
    else:
        centre = world_heart + rng.normal(0.0, 6.0, size=3)
    shape = tuple(int(s) for s in spec.shape)
    c, s = math.cos(rot_z), math.sin(rot_z)
    rot_world = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    origin = rot_world @ centre - sp * (np.asarray(shape) - 1) / 2.0
    return _FieldOfView(shape=shape, origin=origin, rotation_z=rot_z, centre=centre, world_heart=world_heart)


# ----------------------------------------------------------------------------------------------- the painters
# Each painter paints one structure onto the canvas, in anatomical order (later paint covers earlier), and draws
# from ``rng`` in a fixed order: render_ct calls them in the order that defines every cohort's voxels.

@dataclass(frozen=True)
class _Thorax:
    """The whole-image anatomy coordinates and the thoracic cavity the body painter leaves for the others."""

    X: np.ndarray
    Y: np.ndarray
    Z: np.ndarray
    half_width: float  # inner (cavity) half-axes, mm
    half_depth: float
    d_cavity: np.ndarray  # signed distance to the thoracic cavity (2-D, broadcast over z)
    spine_y: float


FULL = (slice(None), slice(None), slice(None))


def _paint_body(cv: _Canvas, an: Anatomy, rng: np.random.Generator) -> _Thorax:
    """Subcutaneous fat, the muscle/ribcage wall, then the thoracic cavity (mediastinal fat by default)."""
    X, Y, Z = cv.coords(FULL)
    inner_w, inner_d = an.thorax_half_width_mm, an.thorax_half_depth_mm
    wall, fat = an.chest_wall_mm, an.subcutaneous_fat_mm
    d_body = sdf_ellipse(X, Y + 8.0, inner_w + wall + fat * 1.2, inner_d + wall + fat)
    cv.paint(FULL, d_body, FAT_HU + rng.normal(0, 4), STRUCTURES["fat"])
    cv.paint(FULL, sdf_ellipse(X, Y + 8.0, inner_w + wall, inner_d + wall), MUSCLE_HU, STRUCTURES["muscle"])
    d_thorax = sdf_ellipse(X, Y, inner_w, inner_d)
    cv.paint(FULL, d_thorax, MEDIASTINAL_FAT_HU, STRUCTURES["fat"])
    return _Thorax(X=X, Y=Y, Z=Z, half_width=inner_w, half_depth=inner_d, d_cavity=d_thorax, spine_y=-inner_d + 25.0)


def _paint_abdomen(cv: _Canvas, body: _Thorax, diaphragm: _Diaphragm) -> np.ndarray:
    """The diaphragm domes and, below them, the upper abdomen (liver on the right). Returns the dome height map."""
    X, Y, Z, w, d = body.X, body.Y, body.Z, body.half_width, body.half_depth
    dome = np.maximum(
        diaphragm.right - ((X - 0.45 * w) ** 2 / (0.75 * w) ** 2 + (Y / d) ** 2) * 70.0,
        diaphragm.left - ((X + 0.45 * w) ** 2 / (0.75 * w) ** 2 + (Y / d) ** 2) * 70.0,
    )
    cv.paint(FULL, np.maximum(body.d_cavity, Z - dome), LIVER_HU, STRUCTURES["abdomen"])
    return dome


def _paint_lungs(cv: _Canvas, body: _Thorax, dome: np.ndarray, diaphragm: _Diaphragm,
                 rng: np.random.Generator) -> None:
    """The cavity lateral to the mediastinum, above the domes, below rounded apices; textured, denser posteriorly."""
    X, Y, Z, w, d = body.X, body.Y, body.Z, body.half_width, body.half_depth
    sp = cv.spacing
    lung_top = diaphragm.right + 190.0 + rng.normal(0.0, 10.0)
    sigma_tex = max(LUNG_TEXTURE_SCALE_MM / sp, 0.5)
    texture = gaussian_filter(rng.standard_normal(cv.shape, dtype=np.float32), sigma=sigma_tex, truncate=2.5)
    texture *= np.float32(LUNG_TEXTURE_SD_HU / _gaussian_noise_gain(sigma_tex, 2.5))
    mediastinum_x = -0.08 * w
    d_lung_2d = np.maximum(body.d_cavity + 3.0, 0.16 * w + 0.1 * np.maximum(Y, 0.0) - np.abs(X - mediastinum_x))
    apex = lung_top - ((np.abs(X) - 0.5 * w) ** 2 / (0.6 * w) ** 2 + (Y / d) ** 2) * 60.0
    d_lung = np.maximum(np.maximum(d_lung_2d, dome + 2.0 - Z), Z - apex)
    texture += LUNG_HU - LUNG_DEPENDENT_HU_PER_MM * Y  # denser posteriorly (dependent lung)
    cv.paint(FULL, d_lung, texture, STRUCTURES["lung"])


def _paint_bones(cv: _Canvas, body: _Thorax, heart_z: float) -> None:
    """Vertebral body with discs, spinous process, ribs sloping anteriorly-down (cartilage gap in front), sternum."""
    X, Y, Z, w, d = body.X, body.Y, body.Z, body.half_width, body.half_depth
    spine_y = body.spine_y
    d_vert = np.sqrt(X**2 + (Y - spine_y) ** 2) - 19.0
    disc = np.abs(((Z + 0.0) % 30.0) - 15.0) < 3.0
    cv.paint(FULL, d_vert, np.where(disc, DISC_HU, CORTICAL_HU).astype(np.float32), STRUCTURES["bone"])
    cv.paint(FULL, d_vert + 3.0, np.where(disc, DISC_HU, CANCELLOUS_HU).astype(np.float32), None)
    cv.paint(FULL, np.sqrt(X**2 + (Y - spine_y + 30.0) ** 2) - 9.0, SPINOUS_PROCESS_HU, STRUCTURES["bone"])
    ring = np.maximum(-sdf_ellipse(X, Y, w + 1.0, d + 1.0), sdf_ellipse(X, Y, w + 11.0, d + 11.0))
    angle_from_front = np.degrees(np.abs(np.arctan2(X, Y)))
    ring = np.where(angle_from_front < 22.0, 50.0, ring)  # costal cartilage gap at the front
    rib_phase = np.abs(((Z + 0.35 * Y) % 32.0) - 16.0) - 5.0
    cv.paint(FULL, np.maximum(ring, rib_phase), RIB_HU, STRUCTURES["bone"])
    sternum = np.maximum(np.maximum(np.abs(X) - 16.0, np.abs(Y - d - 4.0) - 7.0), np.abs(Z - heart_z - 40.0) - 90.0)  # sternum centred 4 cm above the heart
    cv.paint(FULL, sternum, STERNUM_HU, STRUCTURES["bone"])


def _paint_great_vessels(cv: _Canvas, an: Anatomy, heart: _HeartLayout, body: _Thorax, diaphragm: _Diaphragm) -> None:
    """Blood (non-contrast) in the aorta (root, arch, descending), pulmonary trunk and branches, and the SVC."""
    sp = cv.spacing
    to_world = lambda q: heart.centre + heart.basis @ q  # noqa: E731 - heart frame → anatomy coordinates
    root = to_world(heart.shapes["aortic_root"][0])
    ao_r = an.aorta_diameter_mm / 2.0
    arch_z = root[2] + 75.0
    asc_top = np.array([root[0] + 8.0, root[1] - 5.0, arch_z])
    desc_top = np.array([-22.0, body.spine_y + 28.0, arch_z])
    arch_mid = (asc_top + desc_top) / 2.0 + np.array([0.0, 0.0, 18.0])
    segments = [
        (root, asc_top, ao_r, "aorta"), (asc_top, arch_mid, 0.9 * ao_r, "aorta"), (arch_mid, desc_top, 0.85 * ao_r, "aorta"),
        (desc_top, np.array([-20.0, body.spine_y + 30.0, diaphragm.left - 160.0]), 0.8 * ao_r, "aorta"),
    ]
    rv_centre = to_world(heart.shapes["rv"][0])
    pa_start = rv_centre + np.array([-6.0, 8.0, 30.0])
    pa_bif = np.array([pa_start[0] - 12.0, pa_start[1] - 30.0, pa_start[2] + 28.0])
    pa_r = an.pa_diameter_mm / 2.0
    segments += [
        (pa_start, pa_bif, pa_r, "pulmonary_artery"),
        (pa_bif, pa_bif + np.array([-55.0, -20.0, 4.0]), 0.75 * pa_r, "pulmonary_artery"),
        (pa_bif, pa_bif + np.array([60.0, -25.0, -6.0]), 0.72 * pa_r, "pulmonary_artery"),
    ]
    ra_centre = to_world(heart.shapes["ra"][0])
    segments.append((ra_centre + np.array([4.0, -4.0, 10.0]), ra_centre + np.array([6.0, -6.0, 110.0]), 10.0, "aorta_like_svc"))
    for a, b, radius, name in segments:
        mid = (a + b) / 2.0
        sl = cv.box(mid, float(np.linalg.norm(b - a)) / 2.0 + radius + 2 * sp)
        if sl is None:
            continue
        x, y, z = cv.coords(sl)
        label = STRUCTURES["pulmonary_artery"] if name == "pulmonary_artery" else STRUCTURES["aorta"]
        cv.paint(sl, sdf_capsule(x, y, z, a, b, radius), an.blood_hu, label)


@dataclass(frozen=True)
class _HeartBox:
    """The box around the heart, its voxels in the heart frame (q1 base→apex, q2 towards the RV, q3) and the
    pericardial union's signed distance — what calcium, motion blur and the calcium label need afterwards."""

    sl: tuple[slice, slice, slice]
    q1: np.ndarray
    q2: np.ndarray
    q3: np.ndarray
    union: np.ndarray
    outer_mm: float  # epicardial fat + effusion + pericardium


def _paint_heart(cv: _Canvas, an: Anatomy, heart: _HeartLayout, rng: np.random.Generator) -> _HeartBox:
    """The heart, in its own frame: pericardial layers first, chambers last (the LV over the septum)."""
    sp = cv.spacing
    outer = heart.fat_mm + an.effusion_mm + PERICARDIUM_MM
    para = float(np.clip(3.0 + 0.5 * (an.subcutaneous_fat_mm - 10.0), 2.0, 16.0))  # paracardial fat
    lo, hi = heart.bounds(margin=outer + para + 12.0)
    sl = cv.box((lo + hi) / 2.0, (hi - lo) / 2.0)
    x, y, z = cv.coords(sl)
    px, py, pz = x - heart.centre[0], y - heart.centre[1], z - heart.centre[2]
    e = heart.basis
    q1 = px * e[0, 0] + py * e[1, 0] + pz * e[2, 0]
    q2 = px * e[0, 1] + py * e[1, 1] + pz * e[2, 1]
    q3 = px * e[0, 2] + py * e[1, 2] + pz * e[2, 2]

    # Each chamber's distance is computed only near it. The union is read out to outer + para (the outermost
    # painted layer) and outer + BLUR_REACH_MM (the motion-blur weight); soft painting reaches half a voxel beyond,
    # and the smooth union (width k = 10 mm) pulls a distance down by at most k/4, only where two distances differ by
    # less than k. So beyond max(…) + 1.25 k + 1.5 voxels from a chamber's surface, its exact distance and "far"
    # give the same image.
    reach = outer + max(para, BLUR_REACH_MM) + 1.25 * 10.0 + 1.5 * sp
    far = np.float32(1e4)

    def d_of(name: str, grow: float = 0.0):
        centre, axes = heart.shapes[name]
        world = heart.centre + heart.basis @ centre
        half = np.sqrt(((heart.basis * (np.asarray(axes) + grow)) ** 2).sum(axis=1))  # the rotated ellipsoid's AABB
        sub = cv.box(world, half + reach)
        out = np.full(q1.shape, far, dtype=np.float32)
        if sub is None:
            return out
        local = tuple(slice(max(a.start, b.start) - b.start, min(a.stop, b.stop) - b.start) for a, b in zip(sub, sl))
        if any(x.stop <= x.start for x in local):
            return out
        out[local] = sdf_ellipsoid(q1[local] - centre[0], q2[local] - centre[1], q3[local] - centre[2],
                                   *(a + grow for a in axes))
        return out

    d_lv_out = d_of("lv_outer")
    d_rv_out = d_of("rv", heart.walls["rv"])
    d_la_out = d_of("la", heart.walls["atria"])
    d_ra_out = d_of("ra", heart.walls["atria"])
    d_root = d_of("aortic_root", 2.0)
    union = smooth_min(smooth_min(d_lv_out, d_rv_out, 10.0), smooth_min(d_la_out, d_ra_out, 10.0), 10.0)
    union = smooth_min(union, d_root, 6.0)
    cv.paint(sl, union - (outer + para), PARACARDIAL_FAT_HU, STRUCTURES["fat"])
    cv.paint(sl, union - outer, PERICARDIUM_HU, None)  # the pericardium: a thin line, partial volume only
    if an.effusion_mm > 0:
        effusion_hu = float(np.clip(rng.normal(*EFFUSION_HU_MEAN_SD), *EFFUSION_HU_RANGE))
        cv.paint(sl, union - (heart.fat_mm + an.effusion_mm), effusion_hu, STRUCTURES["effusion"])
    cv.paint(sl, union - heart.fat_mm, EPICARDIAL_FAT_HU + rng.normal(0, 4), STRUCTURES["epicardial_fat"])
    myo, blood, lab = an.myocardium_hu, an.blood_hu, STRUCTURES
    for name, d_out, wall_label, cavity_label in (
        ("la", d_la_out, lab["other_myocardium"], lab["la_cavity"]),
        ("ra", d_ra_out, lab["other_myocardium"], lab["ra_cavity"]),
        ("rv", d_rv_out, lab["other_myocardium"], lab["rv_cavity"]),
    ):
        cv.paint(sl, d_out, myo, wall_label)
        cv.paint(sl, d_of(name), blood, cavity_label)
    cv.paint(sl, d_root, blood, lab["aorta"])
    cv.paint(sl, d_lv_out, myo, lab["lv_myocardium"])
    cv.paint(sl, d_of("lv_cavity"), blood, lab["lv_cavity"])
    return _HeartBox(sl=sl, q1=q1, q2=q2, q3=q3, union=union, outer_mm=outer)


def _paint_calcium(cv: _Canvas, an: Anatomy, heart: _HeartLayout, box: _HeartBox, rng: np.random.Generator) -> np.ndarray:
    """Coronary lesions in the epicardial fat along the grooves, the aortic valve ring, the mitral annulus.

    Returns each heart-box voxel's candidate calcium label (0 where none); :func:`_label_calcium` keeps those
    that end up at or above the Agatston threshold once noise is added.
    """
    calcium = []  # (heart-frame centre, radius mm, HU, label)
    h_lv, r_lv, _ = heart.shapes["lv_outer"][1]
    lab = STRUCTURES

    def lesion_sites(n_sites: int, volume_mm3: float, make_site, label: int):
        if volume_mm3 <= 0 or n_sites <= 0:
            return
        shares = rng.dirichlet(np.ones(n_sites))
        for share in shares:
            radius = max((3.0 * volume_mm3 * share / (4.0 * math.pi)) ** (1.0 / 3.0), 0.6)
            calcium.append((make_site(), radius, float(rng.uniform(*CALCIUM_LESION_HU_RANGE)), label))

    def coronary_site():
        vessel = rng.choice(3, p=[0.45, 0.25, 0.30])  # LAD, LCx, RCA
        if vessel == 0:  # anterior interventricular groove
            s_, theta = rng.uniform(-0.8, 0.5), math.radians(rng.normal(55.0, 10.0))
        elif vessel == 1:  # left atrioventricular groove
            s_, theta = rng.uniform(-0.95, -0.75), math.radians(rng.uniform(150.0, 260.0))
        else:  # right atrioventricular groove
            s_, theta = rng.uniform(-0.95, -0.7), math.radians(rng.uniform(70.0, 140.0))
        rho = math.sqrt(max(1.0 - s_**2, 0.0)) * (r_lv + heart.fat_mm * 0.6)
        return np.array([s_ * (h_lv + heart.fat_mm * 0.6), rho * math.cos(theta) * 1.15, rho * math.sin(theta)])

    def ring_site(centre, radius, theta_range):
        theta = rng.uniform(*theta_range)
        return centre + np.array([0.0, radius * math.cos(theta), radius * math.sin(theta)])

    n_cor = int(np.clip(round(1 + 2.0 * math.log10(1.0 + an.coronary_agatston)), 1, 14))
    lesion_sites(n_cor if an.coronary_agatston > 0 else 0, 0.8 * an.coronary_agatston, coronary_site, lab["coronary_calcium"])
    root_c, root_axes = heart.shapes["aortic_root"]
    n_av = int(np.clip(round(1 + 1.5 * math.log10(1.0 + an.av_agatston)), 1, 8))
    lesion_sites(n_av if an.av_agatston > 0 else 0, 0.8 * an.av_agatston,
                 lambda: ring_site(root_c + np.array([-root_axes[0] * 0.6, 0, 0]), root_axes[0] * 0.85, (0, 2 * math.pi)),
                 lab["valve_calcium"])
    mitral_c = np.array([-heart.shapes["lv_cavity"][1][0] * 0.95, 0.0, 0.0])
    lesion_sites(3 if an.mac_volume_mm3 > 0 else 0, an.mac_volume_mm3,
                 lambda: ring_site(mitral_c, r_lv * 0.95, (math.pi * 0.8, math.pi * 1.9)), lab["valve_calcium"])
    calcium_alpha = np.zeros(cv.hu[box.sl].shape, dtype=np.float32)
    calcium_label = np.zeros(cv.hu[box.sl].shape, dtype=np.uint8)
    for centre, radius, hu, label in calcium:
        d = np.sqrt((box.q1 - centre[0]) ** 2 + (box.q2 - centre[1]) ** 2 + (box.q3 - centre[2]) ** 2) - radius
        alpha = cv.paint(box.sl, d, hu, None)
        newer = alpha > calcium_alpha
        calcium_label[newer & (alpha >= 0.25)] = label
        np.maximum(calcium_alpha, alpha, out=calcium_alpha)
    return calcium_label


def _blur_cardiac_motion(cv: _Canvas, an: Anatomy, box: _HeartBox) -> float:
    """Non-gated: motion blurs the heart and its borders, more at high rates and in systole. Returns the blur (mm)."""
    sp = cv.spacing
    systolic = 1.0 if an.phase < 0.4 else 0.55
    blur_mm = 0.6 + 2.2 * systolic * float(np.clip((an.heart_rate_bpm - 45.0) / 70.0, 0.0, 1.0))
    if blur_mm / sp > 0.15:
        region = cv.hu[box.sl]
        blurred = gaussian_filter(region, sigma=blur_mm / sp, truncate=3.0)
        weight = np.clip(1.0 - (box.union - box.outer_mm) / BLUR_REACH_MM, 0.0, 1.0).astype(np.float32)
        region += weight * (blurred - region)
    return blur_mm


def _add_noise(cv: _Canvas, an: Anatomy, rng: np.random.Generator) -> None:
    """Spatially correlated Gaussian noise (correlation length ≈ 0.9 mm) with this patient's SD (dose, body size)."""
    sigma = NOISE_CORRELATION_MM / cv.spacing
    noise = rng.standard_normal(cv.shape, dtype=np.float32)
    if sigma > 0.2:
        noise = gaussian_filter(noise, sigma=sigma, truncate=3.0)
        noise *= 1.0 / _gaussian_noise_gain(sigma, 3.0)
    cv.hu += np.float32(an.noise_sd_hu) * noise


def _label_calcium(cv: _Canvas, box: _HeartBox, calcium_label: np.ndarray) -> None:
    """Lesion voxels at or above the Agatston threshold (130 HU), as a calcium score defines them."""
    region_lab = cv.lab[box.sl]
    is_calcium = (calcium_label > 0) & (cv.hu[box.sl] >= CALCIUM_HU_THRESHOLD)
    region_lab[is_calcium] = calcium_label[is_calcium]


# ----------------------------------------------------------------------------------------------- rendering
def render_ct(anatomy: Anatomy, spec: RenderSpec, rng: np.random.Generator) -> RenderedCT:
    """Render one patient's CT and label map. Deterministic given ``rng``'s state.

    The stages draw from ``rng`` in the order below; that order is part of every cohort's voxels
    (``tests/test_cohort_generate.py`` pins it byte for byte).
    """
    an = anatomy
    diaphragm = _diaphragm(rng)
    heart = _heart_layout(an, rng, an.thorax_half_width_mm, an.thorax_half_depth_mm, diaphragm.left)
    view = _field_of_view(rng, spec, heart)
    cv = _Canvas(view.shape, float(spec.spacing_mm), view.origin, view.rotation_z)
    body = _paint_body(cv, an, rng)
    dome = _paint_abdomen(cv, body, diaphragm)
    _paint_lungs(cv, body, dome, diaphragm, rng)
    _paint_bones(cv, body, heart_z=view.world_heart[2])
    _paint_great_vessels(cv, an, heart, body, diaphragm)
    box = _paint_heart(cv, an, heart, rng)
    calcium_label = _paint_calcium(cv, an, heart, box, rng)
    blur_mm = _blur_cardiac_motion(cv, an, box)
    _add_noise(cv, an, rng)
    _label_calcium(cv, box, calcium_label)

    hu = np.clip(np.rint(cv.hu), -1024, 3071).astype(np.int16)
    affine = np.diag([cv.spacing] * 3 + [1.0])
    affine[:3, 3] = view.origin
    facts = {"epicardial_fat_mm": heart.fat_mm, "lv_wall_at_phase_mm": heart.walls["lv"], "motion_blur_mm": blur_mm,
             "fov_centre_offset_mm": float(np.linalg.norm(view.centre - view.world_heart))}
    return RenderedCT(hu=hu, labelmap=cv.lab, affine=affine, facts=facts)
