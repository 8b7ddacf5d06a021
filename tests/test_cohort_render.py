"""The rendered CT: attenuation per structure, geometry, calcium and the NIfTI written to disk."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy.stats import spearmanr

from xcardia.cohort.measure import ct_measurements
from xcardia.cohort.physiology import sample_patient
from xcardia.cohort.render import CALCIUM_HU_THRESHOLD, STRUCTURES, RenderSpec, render_ct, sdf_ellipsoid
from xcardia.errors import XcardiaError


@pytest.fixture(scope="module")
def rendered():
    """24 patients at 48³, 4 mm, heart-centred, with their ground truth."""
    spec = RenderSpec((48, 48, 48), 4.0, "heart")
    out = []
    for i in range(24):
        p = sample_patient(21, i)
        out.append((p, render_ct(p.anatomy, spec, np.random.default_rng([21, i, 1]))))
    return out


def structure_means(rendered, name):
    values = [ct.hu[ct.labelmap == STRUCTURES[name]] for _, ct in rendered]
    values = np.concatenate([v for v in values if v.size])
    return float(values.mean())


@pytest.mark.parametrize("name, low, high", [
    ("lung", -900, -790),
    ("fat", -140, -50),
    ("muscle", 20, 80),
    ("lv_myocardium", 20, 80),
    ("lv_cavity", 20, 80),
    ("abdomen", 20, 80),
])
def test_mean_attenuation_per_structure(rendered, name, low, high):
    assert low <= structure_means(rendered, name) <= high


def test_air_outside_the_body_is_minus_1000():
    from scipy.ndimage import binary_erosion

    p = sample_patient(0, 2)
    ct = render_ct(p.anatomy, RenderSpec((48, 48, 48), 7.0, "chest"), np.random.default_rng([0, 2, 1]))
    air = binary_erosion(ct.labelmap == STRUCTURES["background"], iterations=2)  # away from the skin's partial volume
    assert air.sum() > 100
    assert abs(np.median(ct.hu[air]) + 1000) < 15


def test_calcium_label_is_at_least_130_hu_and_grows_with_the_agatston_score(rendered):
    volumes, scores = [], []
    for p, ct in rendered:
        calcium = np.isin(ct.labelmap, (STRUCTURES["coronary_calcium"], STRUCTURES["valve_calcium"]))
        assert (ct.hu[calcium] >= CALCIUM_HU_THRESHOLD).all()
        volumes.append(calcium.sum())
        scores.append(p.anatomy.coronary_agatston + p.anatomy.av_agatston + p.anatomy.mac_volume_mm3)
    assert spearmanr(volumes, scores).statistic > 0.6


def test_label_map_heart_volume_tracks_the_true_heart_volume(rendered):
    measured = [ct_measurements(ct.labelmap, 4.0)["heart_volume_ml"] for _, ct in rendered]
    truth = [p.anatomy.heart_volume_ml for p, _ in rendered]
    assert spearmanr(measured, truth).statistic > 0.85


def test_effusion_appears_only_in_patients_with_effusion():
    spec = RenderSpec((40, 40, 40), 5.0, "heart")
    seen = {}
    for i in range(400):
        p = sample_patient(4, i)
        has = p.anatomy.effusion_mm > 10
        if has not in seen:
            ct = render_ct(p.anatomy, spec, np.random.default_rng([4, i, 1]))
            seen[has] = (ct.labelmap == STRUCTURES["effusion"]).sum()
        if len(seen) == 2:
            break
    assert seen[False] == 0 and seen[True] > 20


def test_same_rng_state_gives_identical_voxels():
    p = sample_patient(0, 1)
    spec = RenderSpec((32, 32, 32), 6.0, "heart")
    a = render_ct(p.anatomy, spec, np.random.default_rng([0, 1, 1]))
    b = render_ct(p.anatomy, spec, np.random.default_rng([0, 1, 1]))
    np.testing.assert_array_equal(a.hu, b.hu)
    np.testing.assert_array_equal(a.labelmap, b.labelmap)


def test_chest_field_of_view_holds_the_whole_thorax():
    p = sample_patient(0, 2)
    ct = render_ct(p.anatomy, RenderSpec((48, 48, 48), 7.0, "chest"), np.random.default_rng([0, 2, 1]))
    m = ct_measurements(ct.labelmap, 7.0)
    assert 0.3 < m["heart_thorax_ratio"] < 0.75
    assert (ct.labelmap == STRUCTURES["background"]).any()  # air around the body is in view


@pytest.mark.parametrize("kwargs", [dict(shape=(8, 32, 32)), dict(spacing_mm=0.0), dict(field_of_view="abdomen")])
def test_bad_render_spec_is_refused(kwargs):
    with pytest.raises(XcardiaError):
        RenderSpec(**kwargs)


def test_ellipsoid_sdf_is_negative_inside_zero_on_surface_positive_outside():
    x = np.array([0.0, 10.0, 15.0, 0.0], dtype=np.float32)
    y = np.zeros(4, dtype=np.float32)
    z = np.array([0.0, 0.0, 0.0, 5.0], dtype=np.float32)
    d = sdf_ellipsoid(x, y, z, 10.0, 6.0, 5.0)
    assert d[0] == pytest.approx(-5.0)  # centre: minus the smallest semi-axis
    assert d[1] == pytest.approx(0.0, abs=1e-5)
    assert d[2] == pytest.approx(5.0, rel=0.05)
    assert d[3] == pytest.approx(0.0, abs=1e-5)


def test_written_nifti_has_ras_affine_spacing_and_int16(tiny_cohort):
    img = nib.load(str(tiny_cohort / "ct" / "SYN000000.nii.gz"))
    assert img.get_data_dtype() == np.int16
    assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
    np.testing.assert_allclose(img.header.get_zooms()[:3], (8.0, 8.0, 8.0))
    assert img.header["qform_code"] == 1 and img.header["sform_code"] == 1
    assert img.shape == (24, 24, 24)
    lab = nib.load(str(tiny_cohort / "labelmap" / "SYN000000.nii.gz"))
    np.testing.assert_allclose(lab.affine, img.affine)
    assert lab.get_data_dtype() == np.uint8
