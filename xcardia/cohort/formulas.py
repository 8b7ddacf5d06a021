"""Clinical formulas the synthetic cohort obeys (and the tests check against).

Each function is the guideline formula, vectorised over numpy arrays or floats.
"""

from __future__ import annotations

import numpy as np


def bsa_mosteller(height_cm, weight_kg):
    """Body surface area (m²), Mosteller, NEJM 1987: sqrt(height[cm]·weight[kg]/3600)."""
    return np.sqrt(np.asarray(height_cm, dtype=float) * np.asarray(weight_kg, dtype=float) / 3600.0)


def teichholz_volume(diameter_cm):
    """LV volume (mL) from a linear internal diameter D (cm), Teichholz 1976: V = 7/(2.4 + D)·D³."""
    d = np.asarray(diameter_cm, dtype=float)
    return 7.0 / (2.4 + d) * d**3


def teichholz_diameter(volume_ml):
    """Inverse of :func:`teichholz_volume` (Newton's method; monotone for D > 0)."""
    v = np.asarray(volume_ml, dtype=float)
    d = np.cbrt(v) * 0.95  # starting point: V ≈ D³ for D ≈ 5
    for _ in range(30):
        f = 7.0 / (2.4 + d) * d**3 - v
        df = 7.0 * d**2 * (2.0 * d + 7.2) / (2.4 + d) ** 2
        d = d - f / df
    return d


def teichholz_ejection_fraction(lvidd_cm, lvids_cm):
    """LVEF (%) from LVIDd and LVIDs via Teichholz volumes: 100·(EDV − ESV)/EDV."""
    edv = teichholz_volume(lvidd_cm)
    esv = teichholz_volume(lvids_cm)
    return 100.0 * (edv - esv) / edv


def lv_mass_cube(ivsd_cm, lvidd_cm, lvpwd_cm):
    """LV mass (g), ASE cube formula (Lang et al. JASE 2015, eq. in Table 6):
    0.8·1.04·[(IVSd + LVIDd + LVPWd)³ − LVIDd³] + 0.6."""
    ivs, lvid, pw = (np.asarray(x, dtype=float) for x in (ivsd_cm, lvidd_cm, lvpwd_cm))
    return 0.8 * 1.04 * ((ivs + lvid + pw) ** 3 - lvid**3) + 0.6


def pasp_from_trv(tr_max_velocity_m_s, rap_mmhg):
    """PASP (mmHg) = 4·TRV² + RAP (simplified Bernoulli; Rudski et al. JASE 2010)."""
    v = np.asarray(tr_max_velocity_m_s, dtype=float)
    return 4.0 * v**2 + np.asarray(rap_mmhg, dtype=float)


def bernoulli_peak_gradient(velocity_m_s):
    """Peak pressure gradient (mmHg) = 4·V² (simplified Bernoulli)."""
    return 4.0 * np.asarray(velocity_m_s, dtype=float) ** 2


def qtc_bazett(qt_ms, heart_rate_bpm):
    """QTc (ms), Bazett: QT / sqrt(RR[s])."""
    rr = 60.0 / np.asarray(heart_rate_bpm, dtype=float)
    return np.asarray(qt_ms, dtype=float) / np.sqrt(rr)


def blood_hu_from_haemoglobin(hb_g_dl):
    """Non-contrast blood attenuation (HU) ≈ 3·Hb + 3, Hb in g/dL (the linear relation of the design reference)."""
    return 3.0 * np.asarray(hb_g_dl, dtype=float) + 3.0
