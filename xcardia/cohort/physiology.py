"""Latent cardiac physiology of one synthetic patient → ECHO/ECG tables, labels, concepts and anatomy.

A patient is fully determined by ``(seed, index)``: :func:`sample_patient` draws from its own random stream
(``numpy.random.default_rng([seed, index, 0])``), whatever order or process generates it.

The causal story (docs/method.md §1): demographics → disease processes with severities → true cardiac geometry and
pressures → echo *measurements* of that truth, with inter-observer error → labels and concepts from the
measurements by their guideline thresholds. The CT (``render.py``) is drawn from the *true* geometry, at a random
cardiac phase, so labels are never a deterministic function of the image.

Processes interact as in life: reduced EF dilates the LV and LA, raises PASP and causes functional MR; AS causes
concentric LVH; MR and AF enlarge the LA; pulmonary hypertension dilates the RV/RA and causes TR; age raises AS,
AF and calcium.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from xcardia.cohort import formulas
from xcardia.schema import (
    CONCEPTS,
    EFFUSION_GRADES,
    LABELS,
    REGURGITATION_GRADES,
    grade_at_least,
)

#: Latent regurgitation severity (0–1.2) → grade: upper bounds of none, trace, mild, moderate.
REGURGITATION_CUTS = (0.12, 0.28, 0.50, 0.75)
#: Effusion rim thickness (mm) → grade: upper bounds of none, small, moderate (Adler et al., ESC 2015).
EFFUSION_CUTS_MM = (1.0, 10.0, 20.0)

#: Echo inter-observer measurement error (SD), from reproducibility studies summarised in ASE/EACVI 2015:
#: linear LV dimensions ≈ 0.2–0.3 cm, wall thickness ≈ 10 % (≈ 0.12 cm), velocities ≈ 5–8 %;
#: regurgitation grading agrees only moderately between readers (κ ≈ 0.5–0.6).
ECHO_ERROR_SD = {
    "lv_diameter_cm": 0.22,
    "wall_cm": 0.12,
    "la_diameter_cm": 0.25,
    "velocity_rel": 0.06,
    "grade": 0.10,
    "tapse_cm": 0.25,
    "rv_diameter_cm": 0.3,
    "effusion_mm": 1.5,
    # 2-D biplane LVEF: inter-observer SD ≈ 5 EF points (Otterstad et al., Eur Heart J 1997; test–retest
    # variability 6–7 points in Thavendiranathan et al., JACC 2013)
    "lvef_points": 5.0,
}


MIN_REPORTED_WALL_CM = 0.4


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _grade(severity: float, cuts: tuple[float, ...], names: tuple[str, ...]) -> str:
    for cut, name in zip(cuts, names):
        if severity < cut:
            return name
    return names[-1]


def ventricular_volume_fraction(phase: float) -> float:
    """Fraction of the way from end-systolic to end-diastolic volume at cardiac ``phase`` ∈ [0, 1).

    Phase 0 is end-diastole (R wave); ejection to end-systole at 0.35; rapid filling to 80 % by 0.6; diastasis; the
    atrial kick completes filling at 1.0. Smooth and periodic.
    """
    p = phase % 1.0
    if p < 0.35:
        return 0.5 * (1.0 + math.cos(math.pi * p / 0.35))
    if p < 0.6:
        return 0.8 * 0.5 * (1.0 - math.cos(math.pi * (p - 0.35) / 0.25))
    if p < 0.85:
        return 0.8
    return 0.8 + 0.2 * 0.5 * (1.0 - math.cos(math.pi * (p - 0.85) / 0.15))


@dataclass(frozen=True)
class Anatomy:
    """What the renderer needs: true geometry over the cardiac cycle, the scan's phase, attenuation and image quality.

    Lengths in mm, volumes in mL, attenuation in HU. Positions and orientations are drawn by the renderer.
    ``dataclasses.replace(anatomy, phase=p)`` gives the same patient scanned at another phase.
    """

    sex_male: bool
    thorax_half_width_mm: float
    thorax_half_depth_mm: float
    chest_wall_mm: float
    subcutaneous_fat_mm: float
    phase: float
    heart_rate_bpm: float
    lv_edv_ml: float
    lv_esv_ml: float
    lv_myocardial_ml: float
    rv_edv_ml: float
    rv_ef: float
    la_max_ml: float
    la_ef: float
    ra_max_ml: float
    ra_ef: float
    epicardial_fat_ml: float
    effusion_mm: float
    aorta_diameter_mm: float
    pa_diameter_mm: float
    coronary_agatston: float
    av_agatston: float
    mac_volume_mm3: float
    blood_hu: float
    myocardium_hu: float
    noise_sd_hu: float

    @property
    def _filling(self) -> float:
        return ventricular_volume_fraction(self.phase)

    @property
    def lv_cavity_ml(self) -> float:
        return self.lv_esv_ml + (self.lv_edv_ml - self.lv_esv_ml) * self._filling

    @property
    def lv_diameter_mm(self) -> float:
        return float(formulas.teichholz_diameter(self.lv_cavity_ml)) * 10.0

    @property
    def rv_cavity_ml(self) -> float:
        return self.rv_edv_ml * (1.0 - self.rv_ef * (1.0 - self._filling))

    @property
    def la_cavity_ml(self) -> float:
        """Atria fill while the ventricles empty: maximal at end-systole."""
        return self.la_max_ml * (1.0 - self.la_ef * self._filling)

    @property
    def ra_cavity_ml(self) -> float:
        return self.ra_max_ml * (1.0 - self.ra_ef * self._filling)

    @property
    def heart_volume_ml(self) -> float:
        """Chambers + LV myocardium + thin RV/atrial walls (≈12 % of their cavities) at the current phase."""
        others = self.rv_cavity_ml + self.la_cavity_ml + self.ra_cavity_ml
        return self.lv_cavity_ml + self.lv_myocardial_ml + 1.12 * others


@dataclass
class Patient:
    """One synthetic patient: manifest row values (``table``), ground truth (``gt``) and anatomy."""

    index: int
    patient_id: str
    table: dict[str, object]
    gt: dict[str, float]
    anatomy: Anatomy
    latent: dict[str, float] = field(default_factory=dict)


def patient_id(index: int) -> str:
    return f"SYN{index:06d}"


def patient_index(pid: str) -> int:
    """Inverse of :func:`patient_id`."""
    if not (isinstance(pid, str) and pid.startswith("SYN") and pid[3:].isdigit()):
        raise ValueError(f"{pid!r} is not a synthetic patient id (SYNnnnnnn)")
    return int(pid[3:])


def sample_patient(seed: int, index: int) -> Patient:
    """Draw the physiology, tables, labels, concepts and anatomy of patient ``index`` of cohort ``seed``.

    The stages below run in this order on one random stream; the order of their draws is part of the cohort's
    identity (``tests/test_cohort_generate.py`` pins it byte for byte), so a new draw goes at the end of a stage's
    stream only with a new generator version.
    """
    rng = np.random.default_rng([seed, index, 0])
    person = demographics(rng)
    disease = disease_processes(rng, person)
    heart = true_heart(rng, person, disease)
    tissue = cardiac_tissue(rng, person, disease, heart)
    ecg = electrocardiogram(rng, person, disease, heart)
    echo = echo_report(rng, person, disease, heart, tissue)
    table: dict[str, object] = {**person.columns(), **echo.columns, **ecg.columns(disease)}
    table.update(derive_labels(table))
    table.update(derive_concepts(table))
    anatomy = scan_anatomy(rng, person, heart, tissue, ecg)
    # generator 2.0: the paper's extra echo columns, from a stream of their own (every other value unchanged)
    table.update(paper_echo_measurements(np.random.default_rng([seed, index, 2]), table, heart, disease.af))
    table.update(derive_labels(table))  # LVEF now exists
    return Patient(index=index, patient_id=patient_id(index), table=table,
                   gt=ground_truth(person, heart, tissue, ecg, anatomy), anatomy=anatomy,
                   latent=disease.latent(heart))


# ----------------------------------------------------------------------------------------------- 1. the person
@dataclass(frozen=True)
class Demographics:
    """An echo-referred adult: age, sex, body size and haemoglobin."""

    age_years: float
    male: bool
    height_cm: float
    bmi_kg_m2: float
    weight_kg: float
    bsa_m2: float
    haemoglobin_g_dl: float

    @property
    def age_decades(self) -> float:
        """Decades from the cohort mean (64 years): the scale every age effect below uses."""
        return (self.age_years - 64.0) / 10.0

    def columns(self) -> dict[str, object]:
        return {
            "age_years": round(self.age_years, 1),
            "sex": "M" if self.male else "F",
            "height_cm": round(self.height_cm, 1),
            "weight_kg": round(self.weight_kg, 1),
            "bmi_kg_m2": round(self.bmi_kg_m2, 2),
            "bsa_m2": round(self.bsa_m2, 3),
        }


def demographics(rng: np.random.Generator) -> Demographics:
    n, u = rng.normal, rng.random
    age = float(np.clip(n(64.0, 14.0), 18.0, 95.0))
    male = bool(u() < 0.52)
    height = float(np.clip(n(176.0, 7.0) if male else n(162.0, 6.5), 140.0, 205.0))
    bmi = float(np.clip(math.exp(n(math.log(27.5), 0.19)), 15.0, 60.0))
    weight = bmi * (height / 100.0) ** 2
    bsa = float(formulas.bsa_mosteller(height, weight))
    hb = float(np.clip(n(14.2 if male else 12.9, 1.4) - 0.01 * max(age - 60.0, 0.0), 8.0, 18.5))
    return Demographics(age_years=age, male=male, height_cm=height, bmi_kg_m2=bmi, weight_kg=weight, bsa_m2=bsa,
                        haemoglobin_g_dl=hb)


# ----------------------------------------------------------------------------------------------- 2. disease
@dataclass(frozen=True)
class DiseaseProcesses:
    """Which processes a patient has, and how severe (0–1) or how much pressure (mmHg) they add."""

    htn: bool  # hypertension
    htn_sev: float
    cm: bool  # cardiomyopathy with reduced EF
    cm_sev: float
    hcm: bool  # hypertrophic cardiomyopathy, rare
    as_present: bool  # aortic stenosis
    as_sev: float
    pre_ph: bool  # pre-capillary pulmonary hypertension
    pre_ph_mmhg: float
    af: bool  # atrial fibrillation
    primary_mr: bool
    primary_ar: bool
    paced: bool
    conduction: bool  # a conduction disease (bundle-branch block)

    def latent(self, heart: "TrueHeart") -> dict[str, float]:
        """The latent severities, kept beside the table for tests and the data card."""
        return {"cm_sev": self.cm_sev, "htn_sev": self.htn_sev, "as_sev": self.as_sev, "ar_sev": heart.ar_sev,
                "mr_sev": heart.mr_sev, "tr_sev": heart.tr_sev, "pr_sev": heart.pr_sev, "af": float(self.af),
                "pre_ph": float(self.pre_ph)}


def disease_processes(rng: np.random.Generator, person: Demographics) -> DiseaseProcesses:
    u = rng.random
    age_c, male, bmi = person.age_decades, person.male, person.bmi_kg_m2
    htn = u() < _sigmoid(0.45 + 0.45 * age_c + 0.08 * (bmi - 27.5))
    htn_sev = float(rng.beta(2.0, 3.0)) if htn else 0.0
    cm = u() < _sigmoid(-1.3 + 0.15 * age_c + 0.55 * male)
    cm_sev = float(rng.beta(2.4, 1.6)) if cm else 0.0
    hcm = u() < 0.006
    as_present = u() < _sigmoid(-2.9 + 0.75 * age_c)
    as_sev = float(rng.beta(1.6, 1.6)) if as_present else 0.0
    pre_ph = u() < _sigmoid(-3.6 + 0.1 * age_c)
    pre_ph_mmhg = float(rng.uniform(15.0, 55.0)) if pre_ph else 0.0
    af = u() < _sigmoid(-2.55 + 0.55 * age_c + 1.3 * cm_sev + 0.5 * htn_sev + 1.0 * as_sev)
    primary_mr = u() < _sigmoid(-2.8 + 0.2 * age_c)
    primary_ar = u() < _sigmoid(-4.35 + 0.2 * age_c + 0.4 * male)
    paced = u() < _sigmoid(-3.9 + 0.5 * age_c + 1.0 * af)
    conduction = u() < _sigmoid(-2.5 + 0.3 * age_c + 1.2 * cm_sev)
    return DiseaseProcesses(htn=htn, htn_sev=htn_sev, cm=cm, cm_sev=cm_sev, hcm=hcm, as_present=as_present,
                            as_sev=as_sev, pre_ph=pre_ph, pre_ph_mmhg=pre_ph_mmhg, af=af, primary_mr=primary_mr,
                            primary_ar=primary_ar, paced=paced, conduction=conduction)


# ----------------------------------------------------------------------------------------------- 3. the true heart
@dataclass(frozen=True)
class TrueHeart:
    """True geometry and pressures (what an ideal observer would measure): cm, mL, g, mmHg, m/s."""

    ar_sev: float
    mr_sev: float
    edv_ml: float
    esv_ml: float
    ef_percent: float  # Teichholz EF of the true diameters
    lvidd_cm: float
    lvids_cm: float
    wall_cm: float  # the latent wall thickness both walls scatter around
    ivsd_cm: float
    lvpwd_cm: float
    lv_mass_g: float
    filling: float  # LV filling-pressure index (0 = normal)
    pasp_mmhg: float
    ph_load: float  # pulmonary-hypertension load: (PASP − 35) / 40, ≥ 0
    tr_sev: float
    pr_sev: float
    rap_mmhg: float
    trv_m_s: float
    rv_edv_ml: float
    rv_ef: float
    lavi_ml_m2: float
    la_volume_ml: float
    ra_volume_ml: float


def true_heart(rng: np.random.Generator, person: Demographics, disease: DiseaseProcesses) -> TrueHeart:
    """Left ventricle, then pressures, right heart and atria, as the disease processes shape them."""
    n, u = rng.normal, rng.random
    age_c, male, bsa = person.age_decades, person.male, person.bsa_m2
    d = disease
    cm, cm_sev, htn_sev, as_sev, af = d.cm, d.cm_sev, d.htn_sev, d.as_sev, d.af

    # left ventricle
    edvi = n(56.0, 10.0) if male else n(49.0, 8.0)  # mL/m², ASE/EACVI 2015 2-D normal mean ± SD
    ar_sev = float(np.clip(0.09 * rng.beta(1.2, 3.0) + (rng.beta(2.0, 1.6) * 1.1 if d.primary_ar else 0.0), 0, 1.2))
    edv = edvi * bsa * (1.0 + 0.9 * cm_sev**1.3 + 0.45 * max(ar_sev - 0.3, 0.0))
    ef_true = float(np.clip((n(63.0, 4.5) if not cm else 63.0 - 44.0 * cm_sev + n(0.0, 3.5)), 12.0, 78.0))
    mr_sev = float(np.clip(0.12 * rng.beta(1.5, 3.0) + 0.45 * cm_sev**1.5 + 0.12 * af
                           + (rng.beta(2.2, 1.5) * 1.05 if d.primary_mr else 0.0), 0, 1.2))
    edv *= 1.0 + 0.35 * max(mr_sev - 0.4, 0.0)
    esv = edv * (1.0 - ef_true / 100.0)
    lvidd_true = float(formulas.teichholz_diameter(edv))
    lvids_true = float(formulas.teichholz_diameter(esv))
    ef_true = float(formulas.teichholz_ejection_fraction(lvidd_true, lvids_true))
    wall_base = (0.86 if male else 0.78) + 0.05 * age_c + 0.12 * (bsa - 1.9) + n(0.0, 0.07)
    wall = wall_base + 0.75 * htn_sev + 0.45 * as_sev**1.2 + (rng.uniform(0.5, 1.0) if d.hcm else 0.0) - 0.12 * cm_sev
    ivsd_true = float(max(wall * (1.0 + n(0.03, 0.04)), 0.45))
    lvpwd_true = float(max(wall * (1.0 + n(-0.02, 0.04)), 0.45))
    lv_mass_true = float(formulas.lv_mass_cube(ivsd_true, lvidd_true, lvpwd_true))

    # pressures, right heart, atria
    filling = 0.6 * cm_sev + 0.35 * htn_sev + 0.4 * as_sev + 0.5 * max(mr_sev - 0.3, 0.0)
    pasp_true = (25.0 + 1.2 * age_c + n(0.0, 3.5) + 28.0 * filling + 8.0 * af + d.pre_ph_mmhg)
    pasp_true = float(np.clip(pasp_true, 15.0, 120.0))
    ph_load = max(pasp_true - 35.0, 0.0) / 40.0
    # TR: functional from pulmonary hypertension, atrial-functional (AF, age), device leads, and primary.
    tr_sev = float(np.clip(0.16 * rng.beta(1.5, 2.5) + 0.35 * ph_load + 0.3 * af + 0.04 * max(age_c, 0.0)
                           + 0.35 * d.paced * u() + (rng.beta(2, 2) if u() < 0.05 else 0.0), 0, 1.2))
    pr_sev = float(np.clip(0.1 * rng.beta(1.2, 3.0) + 0.3 * max(ph_load - 0.5, 0.0)
                           + (rng.beta(2.0, 1.5) * 1.1 if u() < 0.009 else 0.0), 0, 1.2))
    rap_latent = 0.4 * tr_sev + 0.35 * ph_load + 0.3 * cm_sev + n(0.0, 0.15)
    rap = 3.0 if rap_latent < 0.2 else (8.0 if rap_latent < 0.5 else 15.0)
    trv_true = math.sqrt(max(pasp_true - rap, 4.0) / 4.0)
    rv_edvi = n(72.0 if male else 60.0, 13.0) * (1.0 + 0.6 * ph_load + 0.4 * tr_sev**1.5 + 0.4 * pr_sev**1.5 + 0.25 * cm_sev)
    rv_ef = float(np.clip(n(0.55, 0.05) - 0.15 * ph_load - 0.15 * cm_sev, 0.2, 0.7))
    lavi = (n(27.0, 6.5) + 14.0 * af + 28.0 * max(mr_sev - 0.2, 0.0) + 14.0 * cm_sev + 8.0 * htn_sev + 10.0 * as_sev)
    ravi = n(25.0 if male else 21.0, 6.5) + 22.0 * max(tr_sev - 0.2, 0.0) + 9.0 * af + 12.0 * ph_load
    return TrueHeart(ar_sev=ar_sev, mr_sev=mr_sev, edv_ml=edv, esv_ml=esv, ef_percent=ef_true, lvidd_cm=lvidd_true,
                     lvids_cm=lvids_true, wall_cm=wall, ivsd_cm=ivsd_true, lvpwd_cm=lvpwd_true, lv_mass_g=lv_mass_true,
                     filling=filling, pasp_mmhg=pasp_true, ph_load=ph_load, tr_sev=tr_sev, pr_sev=pr_sev, rap_mmhg=rap,
                     trv_m_s=trv_true, rv_edv_ml=rv_edvi * bsa, rv_ef=rv_ef, lavi_ml_m2=lavi,
                     la_volume_ml=max(lavi, 12.0) * bsa, ra_volume_ml=max(ravi, 10.0) * bsa)


@dataclass(frozen=True)
class CardiacTissue:
    """Calcium, fat, effusion and great vessels: what a CT shows beside the chambers."""

    coronary_agatston: float
    av_agatston: float
    mac_volume_mm3: float
    epicardial_fat_ml: float
    effusion_mm: float
    pa_diameter_mm: float
    aorta_diameter_mm: float


def cardiac_tissue(rng: np.random.Generator, person: Demographics, disease: DiseaseProcesses,
                   heart: TrueHeart) -> CardiacTissue:
    n, u = rng.normal, rng.random
    age_c, male, bmi, bsa = person.age_decades, person.male, person.bmi_kg_m2, person.bsa_m2
    cac = 0.0
    if u() < _sigmoid(0.2 + 0.9 * age_c + 0.9 * male + 0.6 * disease.cm):
        cac = float(np.clip(math.exp(n(math.log(80.0) + 0.45 * age_c + 0.4 * male, 1.4)), 1.0, 8000.0))
    if disease.as_present:
        av_ca = float(math.exp(math.log(250.0) + 2.6 * disease.as_sev + n(0.0, 0.5)) * (1.0 if male else 0.65))
    elif u() < _sigmoid(-1.6 + 0.8 * age_c):
        av_ca = float(math.exp(n(math.log(40.0), 0.9)))
    else:
        av_ca = 0.0
    mac = float(math.exp(n(math.log(150.0), 0.9))) if u() < _sigmoid(-2.8 + 0.8 * age_c) else 0.0
    epi_fat = float(np.clip(90.0 + 4.0 * (bmi - 27.5) + 10.0 * age_c + 12.0 * male + n(0.0, 28.0), 20.0, 350.0))
    eff_latent = rng.random()
    eff_boost = 0.06 * disease.cm_sev + 0.02 * heart.ph_load
    if eff_latent < 0.005 + eff_boost / 4:
        effusion = float(rng.uniform(20.0, 30.0))
    elif eff_latent < 0.017 + eff_boost / 2:
        effusion = float(rng.uniform(10.0, 20.0))
    elif eff_latent < 0.10 + eff_boost:
        effusion = float(rng.uniform(2.0, 10.0))
    else:
        effusion = 0.0
    pa_diam = float(np.clip(23.5 + 1.6 * (bsa - 1.9) + 0.16 * max(heart.pasp_mmhg - 30.0, 0.0) + n(0.0, 2.4), 16.0, 45.0))
    aorta_diam = float(np.clip(30.0 + 1.2 * age_c + 2.5 * male + 4.0 * max(heart.ar_sev - 0.3, 0.0) + n(0.0, 2.5), 22.0, 55.0))
    return CardiacTissue(coronary_agatston=cac, av_agatston=av_ca, mac_volume_mm3=mac, epicardial_fat_ml=epi_fat,
                         effusion_mm=effusion, pa_diameter_mm=pa_diam, aorta_diameter_mm=aorta_diam)


# ----------------------------------------------------------------------------------------------- 4. the ECG
@dataclass(frozen=True)
class Electrocardiogram:
    """A 12-lead ECG's intervals (ms), rate (bpm), axis (°) and Sokolow–Lyon voltage (mV)."""

    heart_rate_bpm: float
    qrs_ms: float
    qtc_ms: float
    qt_ms: float
    pr_ms: float | None  # no PR interval in atrial fibrillation
    axis_deg: float
    sokolow_lyon_mv: float

    def columns(self, disease: DiseaseProcesses) -> dict[str, object]:
        hr = self.heart_rate_bpm
        return {
            "ventricular_rate_bpm": round(hr),
            "atrial_rate_bpm": None if disease.af else round(hr),
            "pr_interval_ms": None if self.pr_ms is None else round(self.pr_ms),
            "qrs_duration_ms": round(self.qrs_ms),
            "qt_interval_ms": round(self.qt_ms),
            "qtc_ms": round(float(formulas.qtc_bazett(round(self.qt_ms), round(hr)))),
            "qrs_axis_deg": round(self.axis_deg),
            "sokolow_lyon_mv": round(self.sokolow_lyon_mv, 2),
            "ecg_af_flag": int(disease.af),
            "ecg_paced_flag": int(disease.paced),
        }


def electrocardiogram(rng: np.random.Generator, person: Demographics, disease: DiseaseProcesses,
                      heart: TrueHeart) -> Electrocardiogram:
    n, u = rng.normal, rng.random
    d, age_c = disease, person.age_decades
    hr = float(np.clip(n(86.0, 17.0) if d.af else n(70.0, 11.0) + 5.0 * d.cm_sev, 40.0, 150.0))
    if d.paced:
        qrs = float(np.clip(n(158.0, 12.0), 120.0, 210.0))
    elif d.conduction:
        qrs = float(np.clip(n(135.0, 15.0) + 15.0 * d.cm_sev, 110.0, 200.0))
    else:
        qrs = float(np.clip(n(94.0, 10.0) + 10.0 * d.htn_sev, 65.0, 118.0))
    qtc = float(np.clip(n(425.0, 22.0) + 0.6 * (qrs - 95.0) + 15.0 * d.cm_sev, 340.0, 620.0))
    qt = qtc * math.sqrt(60.0 / hr)
    pr = None if d.af else float(np.clip(n(162.0, 22.0) + 4.0 * age_c + 30.0 * d.conduction, 90.0, 400.0))
    axis = float(np.clip(n(35.0, 30.0) - 35.0 * d.htn_sev - 40.0 * (d.paced or d.conduction) * u(), -90.0, 180.0))
    sokolow = float(np.clip(n(2.3 if person.male else 1.9, 0.65) + 2.2 * max(heart.wall_cm - 1.0, 0.0)
                            - 0.035 * (person.bmi_kg_m2 - 27.5), 0.3, 8.0))
    return Electrocardiogram(heart_rate_bpm=hr, qrs_ms=qrs, qtc_ms=qtc, qt_ms=qt, pr_ms=pr, axis_deg=axis,
                             sokolow_lyon_mv=sokolow)


# ----------------------------------------------------------------------------------------------- 5. the echo report
@dataclass(frozen=True)
class EchoReport:
    """The echo columns of a manifest row (measured with observer error, missing as in real reports)."""

    columns: dict[str, object]
    poor_window: bool  # no usable parasternal view: no linear LV measurements at all


def echo_report(rng: np.random.Generator, person: Demographics, disease: DiseaseProcesses, heart: TrueHeart,
                tissue: CardiacTissue) -> EchoReport:
    """What a sonographer reports: each true value plus observer error (``ECHO_ERROR_SD``), then missingness."""
    n, u = rng.normal, rng.random
    e, h, d = ECHO_ERROR_SD, heart, disease
    age_c, bsa, af = person.age_decades, person.bsa_m2, d.af

    # measurements with observer error
    lvidd_m = h.lvidd_cm + n(0.0, e["lv_diameter_cm"])
    lvids_m = h.lvids_cm + n(0.0, e["lv_diameter_cm"])
    lvids_m = min(lvids_m, lvidd_m - 0.25)  # a systolic diameter is never reported above the diastolic one
    # a reader never reports a wall thinner than ~0.4 cm (the validator's plausible range starts at 0.3 cm)
    ivsd_m = max(h.ivsd_cm + n(0.0, e["wall_cm"]), MIN_REPORTED_WALL_CM)
    lvpwd_m = max(h.lvpwd_cm + n(0.0, e["wall_cm"]), MIN_REPORTED_WALL_CM)
    la_diam_true = (6.0 * h.la_volume_ml / math.pi) ** (1.0 / 3.0) * 0.78
    la_diam_m = la_diam_true + n(0.0, e["la_diameter_cm"])
    lavi_m = h.lavi_ml_m2 * (1.0 + n(0.0, 0.12))
    vel = lambda v: v * (1.0 + n(0.0, e["velocity_rel"]))  # noqa: E731 - relative velocity error
    trv_m = vel(h.trv_m_s)
    as_sev = d.as_sev
    av_vmax_true = (1.15 + n(0.0, 0.12) + 0.5 * (person.age_years > 70) * u() + 3.9 * as_sev**1.1 if d.as_present
                    else 1.15 + n(0.0, 0.15))
    av_vmax_m = vel(max(av_vmax_true, 0.6))
    e_vel = float(np.clip(72.0 - 2.5 * age_c + n(0.0, 12.0) + 22.0 * h.filling + 12.0 * h.mr_sev, 25.0, 220.0))
    a_vel = float(np.clip(62.0 + 6.0 * age_c + n(0.0, 11.0) - 15.0 * d.cm_sev, 20.0, 160.0))
    e_sept = float(np.clip(8.5 - 1.2 * age_c + n(0.0, 1.4) - 2.2 * d.htn_sev - 3.0 * d.cm_sev - 2.0 * as_sev, 2.5, 20.0))
    e_lat = float(np.clip(e_sept * 1.3 + n(0.0, 1.1), 3.0, 25.0))
    lvot_d = float(np.clip((2.12 if person.male else 1.92) + 0.15 * (bsa - 1.9) + n(0.0, 0.11), 1.4, 2.9))
    stroke = (h.edv_ml - h.esv_ml) * (1.0 - 0.4 * max(h.mr_sev - 0.3, 0.0))
    lvot_vti = float(np.clip(stroke / (math.pi * (lvot_d / 2.0) ** 2) * (1.0 + n(0.0, 0.08)), 6.0, 42.0))
    tapse = float(np.clip(2.35 - 0.9 * h.ph_load - 0.6 * d.cm_sev + n(0.0, e["tapse_cm"]), 0.5, 3.8))
    rv_basal_true = 3.5 * (h.rv_edv_ml / (66.0 * 1.9)) ** (1.0 / 3.0)
    rv_basal_m = rv_basal_true + n(0.0, e["rv_diameter_cm"])
    effusion = tissue.effusion_mm
    effusion_m = max(effusion + n(0.0, e["effusion_mm"]), 0.0) if effusion > 0 else 0.0

    def measured_grade(sev: float) -> str:
        return _grade(sev + n(0.0, e["grade"]), REGURGITATION_CUTS, REGURGITATION_GRADES)

    ar_g, mr_g, tr_g, pr_g = (measured_grade(s) for s in (h.ar_sev, h.mr_sev, h.tr_sev, h.pr_sev))

    # missingness, as in real reports
    miss = lambda p: u() < p  # noqa: E731
    poor_window = miss(0.025)
    lvidd_r = None if poor_window or miss(0.01) else round(lvidd_m, 2)
    lvids_r = None if poor_window or miss(0.03) else round(lvids_m, 2)
    walls_missing = poor_window or miss(0.02)
    ivsd_r = None if walls_missing else round(ivsd_m, 2)
    lvpwd_r = None if walls_missing or miss(0.01) else round(lvpwd_m, 2)
    tr_jet = u() < (0.96 if h.tr_sev >= 0.28 or h.pasp_mmhg > 40 else 0.62)
    trv_r = round(trv_m, 2) if tr_jet else None
    # PASP from the *rounded* TRV, so that 4·TRV² + RAP holds exactly on the written values
    pasp_r = float(formulas.pasp_from_trv(trv_r, h.rap_mmhg)) if trv_r is not None else None
    av_vmax_r = None if miss(0.03) else round(av_vmax_m, 2)
    as_suspected = av_vmax_r is not None and av_vmax_r >= 2.5
    av_peak_g = float(formulas.bernoulli_peak_gradient(av_vmax_r)) if as_suspected else None
    av_mean_g = av_peak_g * float(np.clip(n(0.6, 0.04), 0.5, 0.7)) if as_suspected else None

    edv_r = esv_r = None
    if lvidd_r is not None and lvids_r is not None:
        edv_r = round(float(formulas.teichholz_volume(lvidd_r)), 2)
        esv_r = round(float(formulas.teichholz_volume(lvids_r)), 2)
    mass_r = None
    if lvidd_r is not None and ivsd_r is not None and lvpwd_r is not None:
        mass_r = round(float(formulas.lv_mass_cube(ivsd_r, lvidd_r, lvpwd_r)), 2)

    e_prime_mean = (e_sept + e_lat) / 2.0
    columns: dict[str, object] = {  # draws inside this literal happen in its order
        "lvidd_cm": lvidd_r,
        "lvids_cm": lvids_r,
        "ivsd_cm": ivsd_r,
        "lvpwd_cm": lvpwd_r,
        "lv_edv_ml": edv_r,
        "lv_esv_ml": esv_r,
        "lv_mass_g": mass_r,
        "lv_mass_index_g_m2": round(mass_r / round(bsa, 3), 2) if mass_r is not None else None,
        "la_diameter_cm": None if miss(0.03) else round(la_diam_m, 2),
        "la_volume_index_ml_m2": None if miss(0.08) else round(max(lavi_m, 8.0), 1),
        "mv_e_velocity_cm_s": round(e_vel, 1),
        "mv_a_velocity_cm_s": None if af else round(a_vel, 1),
        "mv_e_a_ratio": None if af else round(e_vel / a_vel, 2),
        "e_prime_septal_cm_s": round(e_sept, 1),
        "e_prime_lateral_cm_s": round(e_lat, 1),
        "e_prime_mean_cm_s": round(e_prime_mean, 2),
        "e_e_prime_ratio": round(e_vel / e_prime_mean, 2),
        "lvot_diameter_cm": None if miss(0.06) else round(lvot_d, 2),
        "lvot_vti_cm": None if miss(0.06) else round(lvot_vti, 1),
        "av_peak_velocity_m_s": av_vmax_r,
        "av_peak_gradient_mmhg": round(av_peak_g, 1) if av_peak_g is not None else None,
        "av_mean_gradient_mmhg": round(av_mean_g, 1) if av_mean_g is not None else None,
        "ar_grade": None if miss(0.015) else ar_g,
        "mr_grade": None if miss(0.01) else mr_g,
        "tr_grade": None if miss(0.01) else tr_g,
        "pr_grade": None if miss(0.03) else pr_g,
        "tr_max_velocity_m_s": trv_r,
        "rap_mmhg": h.rap_mmhg,
        "pasp_mmhg": round(pasp_r, 2) if pasp_r is not None else None,
        "tapse_cm": None if miss(0.08) else round(tapse, 2),
        "rv_basal_diameter_cm": None if miss(0.05) else round(rv_basal_m, 2),
        "pericardial_effusion": _grade(effusion_m, EFFUSION_CUTS_MM, EFFUSION_GRADES),
    }
    return EchoReport(columns=columns, poor_window=poor_window)


def paper_echo_measurements(rng: np.random.Generator, table: dict, heart: TrueHeart, af: bool) -> dict:
    """Generator 2.0: the echo columns of the paper's tabular input that version 1.0 lacked, and LVEF as a
    measurement of its own. Drawn from a separate stream (``[seed, index, 2]``) so every other value of a patient
    is the same as in version 1.0.

    LVEF is measured as an echo lab does (biplane Simpson from apical views, or a visual estimate): from the true
    volumes with its own observer error, not from the reported M-mode diameters — which would hand the tabular
    encoder the very numbers two NW concepts threshold. It needs apical views, so it is missing in ~2 %
    (independently of the parasternal window that the diameters need).
    """
    n, u = rng.normal, rng.random
    e = ECHO_ERROR_SD
    edv, esv = heart.edv_ml, heart.esv_ml
    lvef = float(np.clip((edv - esv) / edv * 100.0 + n(0.0, e["lvef_points"]), 8.0, 82.0))
    lvef_r = None if u() < 0.02 else round(lvef, 1)
    d = table.get("lvot_diameter_cm")
    vti = table.get("lvot_vti_cm")
    ejection_s = float(np.clip(n(0.30, 0.025), 0.22, 0.38))  # LV ejection time
    # LVOT and AV VTI ≈ ½ · Vmax · ejection time (a triangular Doppler envelope)
    lvot_vmax = None if vti is None else round(float(np.clip(2.0 * vti / 100.0 / ejection_s * (1 + n(0, 0.06)), 0.35, 2.4)), 2)
    av_vmax = table.get("av_peak_velocity_m_s")
    av_vti = None if av_vmax is None else round(float(np.clip(0.5 * av_vmax * 100.0 * ejection_s * (1 + n(0, 0.08)), 9.0, 190.0)), 1)
    # an MR jet is recorded when one is seen (≥ mild): peak velocity from the LV–LA systolic gradient
    mr_seen = table.get("mr_grade") in ("mild", "moderate", "severe") and u() < 0.85
    lv_la_gradient = float(np.clip(n(110.0, 15.0) - 25.0 * heart.mr_sev, 45.0, 170.0))  # mmHg
    mr_vmax = round(float(np.clip(math.sqrt(lv_la_gradient / 4.0) * (1 + n(0, 0.05)), 2.5, 7.0)), 2) if mr_seen else None
    mr_vti = round(float(np.clip(mr_vmax * 100.0 * 0.65 * ejection_s * 1.1 * (1 + n(0, 0.1)), 45.0, 280.0)), 1) if mr_seen else None
    a_sept = None if af else round(float(np.clip(n(9.0, 1.6) + 0.6 * max((table["age_years"] - 64.0) / 10.0, -2.0), 3.0, 18.0)), 1)
    a_lat = None if af else round(float(np.clip(a_sept * 1.1 + n(0.0, 1.2), 3.0, 20.0)), 1)
    trv = table.get("tr_max_velocity_m_s")
    return {
        "lvef_percent": lvef_r,
        "a_prime_septal_cm_s": a_sept,
        "a_prime_lateral_cm_s": a_lat,
        "lvot_area_cm2": None if d is None else round(math.pi * (d / 2.0) ** 2, 2),
        "lvot_peak_velocity_m_s": lvot_vmax,
        "av_vti_cm": av_vti,
        "mr_peak_velocity_m_s": mr_vmax,
        "mr_vti_cm": mr_vti,
        "pasp_minus_rap_mmhg": None if trv is None else round(4.0 * trv**2, 2),
    }


# ----------------------------------------------------------------------------------------------- 6. the scan
#: Myocardial density (g/mL), to turn LV mass into the myocardial volume the renderer paints.
MYOCARDIAL_DENSITY_G_ML = 1.05


def scan_anatomy(rng: np.random.Generator, person: Demographics, heart: TrueHeart, tissue: CardiacTissue,
                 ecg: Electrocardiogram) -> Anatomy:
    """The CT's truth: body habitus, dose and attenuation at a random cardiac phase (non-gated)."""
    n, u = rng.normal, rng.random
    male, bmi, height = person.male, person.bmi_kg_m2, person.height_cm
    phase = float(rng.random())
    thorax_w = 128.0 * (height / 170.0) * (1.06 if male else 0.95) * (1.0 + 0.004 * (bmi - 25.0)) * (1 + n(0, 0.04))
    thorax_d = 92.0 * (height / 170.0) * (1.04 if male else 0.96) * (1.0 + 0.008 * (bmi - 25.0)) * (1 + n(0, 0.05))
    subcut = float(np.clip((4.0 + 1.7 * (bmi - 20.0)) * (1.25 if not male else 1.0) * (1 + n(0, 0.2)), 2.0, 70.0))
    low_dose = u() < 0.35
    body_depth = 2.0 * (thorax_d + 14.0 + subcut)
    noise_sd = float(np.clip(math.exp(n(math.log(15.0), 0.18)) * (body_depth / 250.0) ** 1.5 * (1.6 if low_dose else 1.0),
                             10.0, 40.0))
    myo_hu = float(np.clip(n(50.0, 2.5), 45.0, 55.0))
    # Atrioventricular-plane motion: while the ventricles eject, the atria fill by most of the ventricular stroke
    # volume (60–80 %), so the whole heart changes by only ≈8 % over the cycle (Carlsson et al., Am J Physiol 2004).
    la_vol, ra_vol = heart.la_volume_ml, heart.ra_volume_ml
    stroke_total = (heart.edv_ml - heart.esv_ml) + heart.rv_edv_ml * heart.rv_ef
    return Anatomy(
        sex_male=male,
        thorax_half_width_mm=float(thorax_w),
        thorax_half_depth_mm=float(thorax_d),
        chest_wall_mm=float(np.clip(n(14.0, 2.0), 9.0, 22.0)),
        subcutaneous_fat_mm=subcut,
        phase=phase,
        heart_rate_bpm=ecg.heart_rate_bpm,
        lv_edv_ml=float(heart.edv_ml),
        lv_esv_ml=float(heart.esv_ml),
        lv_myocardial_ml=float(heart.lv_mass_g / MYOCARDIAL_DENSITY_G_ML),
        rv_edv_ml=float(heart.rv_edv_ml),
        rv_ef=heart.rv_ef,
        la_max_ml=float(la_vol),
        la_ef=min(0.7 * stroke_total * la_vol / (la_vol + ra_vol) / la_vol, 0.8),
        ra_max_ml=float(ra_vol),
        ra_ef=min(0.7 * stroke_total * ra_vol / (la_vol + ra_vol) / ra_vol, 0.8),
        epicardial_fat_ml=tissue.epicardial_fat_ml,
        effusion_mm=tissue.effusion_mm,
        aorta_diameter_mm=tissue.aorta_diameter_mm,
        pa_diameter_mm=tissue.pa_diameter_mm,
        coronary_agatston=tissue.coronary_agatston,
        av_agatston=tissue.av_agatston,
        mac_volume_mm3=tissue.mac_volume_mm3,
        blood_hu=float(formulas.blood_hu_from_haemoglobin(person.haemoglobin_g_dl)),
        myocardium_hu=myo_hu,
        noise_sd_hu=noise_sd,
    )


def ground_truth(person: Demographics, heart: TrueHeart, tissue: CardiacTissue, ecg: Electrocardiogram,
                 anatomy: Anatomy) -> dict[str, float]:
    """The ``gt_*`` manifest columns: true values the echo report only estimates (for the data card and tests)."""
    return {
        "gt_cardiac_phase": round(anatomy.phase, 4),
        "gt_heart_rate_bpm": round(ecg.heart_rate_bpm, 1),
        "gt_coronary_agatston": round(tissue.coronary_agatston, 1),
        "gt_av_agatston": round(tissue.av_agatston, 1),
        "gt_mac_volume_mm3": round(tissue.mac_volume_mm3, 1),
        "gt_heart_volume_ml": round(anatomy.heart_volume_ml, 1),
        "gt_lv_myocardial_volume_ml": round(heart.lv_mass_g / MYOCARDIAL_DENSITY_G_ML, 1),
        "gt_epicardial_fat_ml": round(tissue.epicardial_fat_ml, 1),
        "gt_effusion_thickness_mm": round(tissue.effusion_mm, 2),
        "gt_pa_diameter_mm": round(tissue.pa_diameter_mm, 2),
        "gt_blood_hu": round(anatomy.blood_hu, 2),
        "gt_myocardium_hu": round(anatomy.myocardium_hu, 2),
        "gt_noise_sd_hu": round(anatomy.noise_sd_hu, 2),
        "gt_haemoglobin_g_dl": round(person.haemoglobin_g_dl, 2),
        "gt_lvef_percent": round(heart.ef_percent, 2),
        "gt_lvidd_cm": round(heart.lvidd_cm, 3),
        "gt_lvids_cm": round(heart.lvids_cm, 3),
        "gt_ivsd_cm": round(heart.ivsd_cm, 3),
        "gt_lvpwd_cm": round(heart.lvpwd_cm, 3),
        "gt_pasp_mmhg": round(heart.pasp_mmhg, 2),
        "gt_rv_edv_ml": round(heart.rv_edv_ml, 1),
        "gt_la_volume_ml": round(heart.la_volume_ml, 1),
        "gt_ra_volume_ml": round(heart.ra_volume_ml, 1),
    }


def _value(table: dict, key: str) -> float:
    v = table.get(key)
    if v is None or v == "":
        return float("nan")
    return float(v)


def derive_labels(table: dict) -> dict[str, float]:
    """The ten task labels from a table row by their thresholds (1.0, 0.0 or NaN when the measurement is missing).

    ``shd_flag`` (any structural heart disease) is 1 if any other label is 1 or the effusion is moderate or
    large; 0 if LVEF, wall thickness and all four valve grades were assessed and none is abnormal (PASP and TRV are
    not required: without a TR jet, PASP cannot be estimated and is read as not elevated); missing otherwise.
    """
    lvef = _value(table, "lvef_percent")
    walls = [_value(table, "ivsd_cm"), _value(table, "lvpwd_cm")]
    wall = np.nan if all(math.isnan(w) for w in walls) else np.nanmax(walls)
    vmax = _value(table, "av_peak_velocity_m_s")
    pasp = _value(table, "pasp_mmhg")
    trv = _value(table, "tr_max_velocity_m_s")

    def flag(value: float, predicate) -> float:
        return float("nan") if math.isnan(value) else float(predicate(value))

    labels = {
        "lvef_lte_45_flag": flag(lvef, lambda v: v <= 45.0),
        "lvwt_gte_13_flag": flag(wall, lambda v: v >= 1.3),
        "aortic_stenosis_moderate_severe_flag": flag(vmax, lambda v: v >= 3.0),  # AHA/ACC 2020: Vmax ≥ 3 m/s
        "aortic_regurgitation_moderate_severe_flag": grade_at_least(table.get("ar_grade"), "moderate"),
        "mitral_regurgitation_moderate_severe_flag": grade_at_least(table.get("mr_grade"), "moderate"),
        "tricuspid_regurgitation_moderate_severe_flag": grade_at_least(table.get("tr_grade"), "moderate"),
        "pulmonary_regurgitation_moderate_severe_flag": grade_at_least(table.get("pr_grade"), "moderate"),
        "pasp_gte_45_flag": flag(pasp, lambda v: v >= 45.0),
        "tr_max_gte_32_flag": flag(trv, lambda v: v >= 3.2),
    }
    effusion = grade_at_least(table.get("pericardial_effusion"), "moderate", EFFUSION_GRADES)
    components = list(labels.values()) + [effusion]
    required = [labels[k] for k in LABELS[:7]]
    if any(v == 1.0 for v in components):
        shd = 1.0
    elif not any(math.isnan(v) for v in required):
        shd = 0.0
    else:
        shd = float("nan")
    labels["shd_flag"] = shd
    return labels


def derive_concepts(table: dict) -> dict[str, float]:
    """The four NW concepts: 1.0 if the measurement lies outside its normal interval, 0.0 inside, NaN if missing.

    This is defect 2 of the public code fixed: a missing measurement gives a missing concept, never "abnormal".
    """
    out = {}
    for name, (column, (low, high)) in CONCEPTS.items():
        v = _value(table, column)
        out[name] = float("nan") if math.isnan(v) else float(v < low or v > high)
    return out
