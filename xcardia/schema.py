"""The manifest schema: every column, its unit, its allowed values and its reference range.

One home for column names, used by the generator (what it writes), the validator (what it checks) and the
notebooks (what they plot against). Units are part of each name (``lvidd_cm``, ``pasp_mmhg``).

Reference ranges: Lang et al., *Recommendations for cardiac chamber quantification by echocardiography*,
JASE 2015 (ASE/EACVI 2015); Otto et al., *2020 ACC/AHA guideline for valvular heart disease* (AHA/ACC 2020);
Rudski et al., JASE 2010 (right heart); Nagueh et al., JASE 2016 (diastolic function).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Regurgitation grades in increasing order, as echo reports write them. ``presumed none`` is a word the paper's
#: data uses; it reads as ``none`` here (the public reader, ``Finetuning.py:223``, makes it and ``trace`` a missing
#: label: register D13).
REGURGITATION_GRADES: tuple[str, ...] = ("none", "trace", "mild", "moderate", "severe")
EFFUSION_GRADES: tuple[str, ...] = ("none", "small", "moderate", "large")
SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")

#: The paper's ten downstream tasks, named as in its code.
LABELS: tuple[str, ...] = (
    "lvef_lte_45_flag",
    "lvwt_gte_13_flag",
    "aortic_stenosis_moderate_severe_flag",
    "aortic_regurgitation_moderate_severe_flag",
    "mitral_regurgitation_moderate_severe_flag",
    "tricuspid_regurgitation_moderate_severe_flag",
    "pulmonary_regurgitation_moderate_severe_flag",
    "pasp_gte_45_flag",
    "tr_max_gte_32_flag",
    "shd_flag",
)

#: Short names for tables and figures.
LABEL_SHORT: dict[str, str] = {
    "lvef_lte_45_flag": "LVEF≤45",
    "lvwt_gte_13_flag": "LVWT≥1.3",
    "aortic_stenosis_moderate_severe_flag": "AS",
    "aortic_regurgitation_moderate_severe_flag": "AR",
    "mitral_regurgitation_moderate_severe_flag": "MR",
    "tricuspid_regurgitation_moderate_severe_flag": "TR",
    "pulmonary_regurgitation_moderate_severe_flag": "PR",
    "pasp_gte_45_flag": "PASP≥45",
    "tr_max_gte_32_flag": "TRV≥3.2",
    "shd_flag": "SHD",
}

#: Label prevalences of the EchoNext training set, the realism target of the synthetic cohort (docs/method.md §1).
ECHONEXT_PREVALENCE: dict[str, float] = {
    "lvef_lte_45_flag": 0.23,
    "lvwt_gte_13_flag": 0.24,
    "aortic_stenosis_moderate_severe_flag": 0.04,
    "aortic_regurgitation_moderate_severe_flag": 0.012,
    "mitral_regurgitation_moderate_severe_flag": 0.085,
    "tricuspid_regurgitation_moderate_severe_flag": 0.106,
    "pulmonary_regurgitation_moderate_severe_flag": 0.008,
    "pasp_gte_45_flag": 0.19,
    "tr_max_gte_32_flag": 0.10,
    "shd_flag": 0.52,
}

#: The paper's four NW concepts: measurement column → normal interval (ASE/EACVI 2015, cm).
#: A value outside the interval is "abnormal" (1); a missing measurement gives a missing concept.
CONCEPTS: dict[str, tuple[str, tuple[float, float]]] = {
    "concept_ivsd_abnormal": ("ivsd_cm", (0.6, 1.1)),
    "concept_lvpwd_abnormal": ("lvpwd_cm", (0.6, 1.1)),
    "concept_lvidd_abnormal": ("lvidd_cm", (3.5, 5.6)),
    "concept_lvids_abnormal": ("lvids_cm", (2.0, 4.0)),
}


@dataclass(frozen=True)
class Column:
    """One manifest column.

    Attributes:
        name: column name, unit suffix included.
        group: ``id``, ``image`` (geometry a file lacks), ``demographics``, ``echo``, ``ecg``, ``label``,
            ``concept`` or ``gt`` (ground truth that no real table has: never a model input).
        kind: ``float``, ``category``, ``flag`` (1/0/missing) or ``text``.
        unit: human-readable unit ("" for none).
        plausible: (low, high) outside which a value is physiologically impossible (a validation error).
        normal: (low, high) reference interval, for plots and data cards, or None.
        categories: allowed values of a ``category`` column.
        unit_mistakes: (factor, wrong unit) pairs: a value that is plausible once multiplied by ``factor`` was most
            likely written in ``wrong unit`` (``(0.1, "mm")`` for a cm column holding mm).
        description: what the column means and where its formula comes from.
    """

    name: str
    group: str
    kind: str
    unit: str
    description: str
    plausible: tuple[float, float] | None = None
    normal: tuple[float, float] | None = None
    categories: tuple[str, ...] = ()
    unit_mistakes: tuple[tuple[float, str], ...] = field(default_factory=tuple)


_MM_IN_CM = ((0.1, "mm"),)
_FRACTION = ((100.0, "a fraction (0–1) instead of percent"),)
_CM_S_IN_M_S = ((0.01, "cm/s"),)
_M_S_IN_CM_S = ((100.0, "m/s"),)
_S_IN_MS = ((1000.0, "seconds"),)


COLUMNS: tuple[Column, ...] = (
    # identity and files
    Column("patient_id", "id", "text", "", "Unique patient identifier (one row per patient)."),
    Column("ct_path", "id", "text", "", "CT image path relative to the manifest: NIfTI file, DICOM series folder or .npy."),
    Column("labelmap_path", "id", "text", "", "Optional structure label map (synthetic cohort only)."),
    Column("split", "id", "category", "", "Patient-level split.", categories=SPLITS),
    Column("heart_mask_path", "id", "text", "",
           "Optional: binary heart mask in the CT's space (TotalSegmentator's heart.nii.gz) that centres the "
           "heart crop of the CPU profiles; without it a heuristic finds the heart."),
    Column("npy_spacing_mm", "image", "float", "mm",
           "Optional: isotropic voxel spacing of a .npy volume (it carries no geometry; the paper's are 2 mm). "
           "Ignored for NIfTI and DICOM, whose headers give the spacing.", (0.2, 10.0)),
    # demographics
    Column("age_years", "demographics", "float", "years", "Age at CT.", (18, 110), None),
    Column("sex", "demographics", "category", "", "Sex.", categories=("M", "F")),
    Column("height_cm", "demographics", "float", "cm", "Height.", (120, 220), None, unit_mistakes=((100.0, "m"),)),
    Column("weight_kg", "demographics", "float", "kg", "Weight.", (30, 250), None, unit_mistakes=((0.4536, "lb"),)),
    Column("bmi_kg_m2", "demographics", "float", "kg/m²", "Body-mass index.", (12, 70), (18.5, 25)),
    Column("bsa_m2", "demographics", "float", "m²", "Body surface area, Mosteller: sqrt(height·weight/3600).",
           (1.0, 3.2), None),
    # ECHO: left ventricle
    Column("lvef_percent", "echo", "float", "%",
           "LV ejection fraction measured on its own (biplane-method-like, from the true volumes, with its own observer "
           "error) — not Teichholz of the reported diameters.", (5, 85), (52, 72), unit_mistakes=_FRACTION),
    Column("lvidd_cm", "echo", "float", "cm", "LV internal diameter, end-diastole (linear).", (2.5, 9.0), (3.5, 5.6),
           unit_mistakes=_MM_IN_CM),
    Column("lvids_cm", "echo", "float", "cm", "LV internal diameter, end-systole (linear).", (1.2, 8.0), (2.0, 4.0),
           unit_mistakes=_MM_IN_CM),
    Column("ivsd_cm", "echo", "float", "cm", "Interventricular septum thickness, end-diastole.", (0.3, 3.0), (0.6, 1.1),
           unit_mistakes=_MM_IN_CM),
    Column("lvpwd_cm", "echo", "float", "cm", "LV posterior wall thickness, end-diastole.", (0.3, 3.0), (0.6, 1.1),
           unit_mistakes=_MM_IN_CM),
    Column("lv_edv_ml", "echo", "float", "mL", "LV end-diastolic volume, Teichholz: 7/(2.4+D)·D³.", (20, 600), None),
    Column("lv_esv_ml", "echo", "float", "mL", "LV end-systolic volume, Teichholz.", (5, 500), None),
    Column("lv_mass_g", "echo", "float", "g",
           "LV mass, ASE cube formula: 0.8·1.04·[(IVSd+LVIDd+LVPWd)³−LVIDd³]+0.6 (thin measured walls can give "
           "~30 g).", (25, 1200), None),
    Column("lv_mass_index_g_m2", "echo", "float", "g/m²", "LV mass / BSA.", (12, 600), (43, 115)),
    # ECHO: atria, diastolic function
    Column("la_diameter_cm", "echo", "float", "cm", "LA anteroposterior diameter.", (1.5, 9.0), (2.7, 4.0),
           unit_mistakes=_MM_IN_CM),
    Column("la_volume_index_ml_m2", "echo", "float", "mL/m²", "LA maximal volume / BSA.", (8, 200), (16, 34)),
    Column("mv_e_velocity_cm_s", "echo", "float", "cm/s", "Mitral inflow peak E velocity.", (20, 250), None,
           unit_mistakes=_M_S_IN_CM_S),
    Column("mv_a_velocity_cm_s", "echo", "float", "cm/s", "Mitral inflow peak A velocity (missing in AF).", (10, 200), None,
           unit_mistakes=_M_S_IN_CM_S),
    Column("mv_e_a_ratio", "echo", "float", "", "E/A ratio (missing in AF).", (0.2, 6.0), (0.8, 2.0)),
    Column("e_prime_septal_cm_s", "echo", "float", "cm/s", "Septal mitral annular e′.", (1.5, 25), (7, 16)),
    Column("e_prime_lateral_cm_s", "echo", "float", "cm/s", "Lateral mitral annular e′.", (1.5, 30), (10, 20)),
    Column("e_prime_mean_cm_s", "echo", "float", "cm/s", "Mean of septal and lateral e′.", (1.5, 28), None),
    Column("e_e_prime_ratio", "echo", "float", "", "E/e′ (mean).", (2, 50), (0, 14)),
    Column("a_prime_septal_cm_s", "echo", "float", "cm/s", "Septal mitral annular a′ (missing in AF).", (1.5, 25), None),
    Column("a_prime_lateral_cm_s", "echo", "float", "cm/s", "Lateral mitral annular a′ (missing in AF).", (1.5, 25), None),
    # ECHO: aortic valve and outflow
    Column("lvot_diameter_cm", "echo", "float", "cm", "LV outflow tract diameter.", (1.2, 3.2), (1.8, 2.4),
           unit_mistakes=_MM_IN_CM),
    Column("lvot_vti_cm", "echo", "float", "cm", "LVOT velocity-time integral.", (5, 45), (18, 22)),
    Column("lvot_area_cm2", "echo", "float", "cm²", "LVOT area, π·(diameter/2)².", (1.0, 8.5), None),
    Column("lvot_peak_velocity_m_s", "echo", "float", "m/s", "LVOT peak velocity (pulsed wave).", (0.3, 2.5), (0.7, 1.1),
           unit_mistakes=_CM_S_IN_M_S),
    Column("av_peak_velocity_m_s", "echo", "float", "m/s", "Aortic valve peak velocity (Vmax).", (0.5, 7.0), (0.8, 2.0),
           unit_mistakes=_CM_S_IN_M_S),
    Column("av_peak_gradient_mmhg", "echo", "float", "mmHg",
           "AV peak gradient, simplified Bernoulli 4·Vmax² (reported when Vmax ≥ 2.5 m/s).", (1, 200), None),
    Column("av_mean_gradient_mmhg", "echo", "float", "mmHg", "AV mean gradient (reported when Vmax ≥ 2.5 m/s).", (1, 130), (0, 20)),
    Column("av_vti_cm", "echo", "float", "cm", "Aortic valve velocity-time integral (with the AV Vmax).", (8, 200), None),
    Column("mr_peak_velocity_m_s", "echo", "float", "m/s",
           "Peak MR jet velocity (recorded only when an MR jet of at least mild grade is seen).", (2.0, 7.5), None,
           unit_mistakes=_CM_S_IN_M_S),
    Column("mr_vti_cm", "echo", "float", "cm", "MR jet velocity-time integral (recorded with the MR peak velocity).",
           (40, 300), None),
    # ECHO: regurgitation grades
    Column("ar_grade", "echo", "category", "", "Aortic regurgitation grade.", categories=REGURGITATION_GRADES),
    Column("mr_grade", "echo", "category", "", "Mitral regurgitation grade.", categories=REGURGITATION_GRADES),
    Column("tr_grade", "echo", "category", "", "Tricuspid regurgitation grade.", categories=REGURGITATION_GRADES),
    Column("pr_grade", "echo", "category", "", "Pulmonary regurgitation grade.", categories=REGURGITATION_GRADES),
    # ECHO: right heart and pressures
    Column("tr_max_velocity_m_s", "echo", "float", "m/s", "Peak TR jet velocity (missing without a TR jet).", (0.8, 6.5),
           (0, 2.8), unit_mistakes=_CM_S_IN_M_S),
    Column("rap_mmhg", "echo", "float", "mmHg", "Estimated right atrial pressure (3, 8 or 15, from IVC).", (0, 25), (0, 5)),
    Column("pasp_mmhg", "echo", "float", "mmHg", "Pulmonary artery systolic pressure: 4·TRV² + RAP.", (10, 150), (0, 35)),
    Column("pasp_minus_rap_mmhg", "echo", "float", "mmHg", "RV–RA systolic gradient 4·TRV² (PASP − RAP).", (2, 150), None),
    Column("tapse_cm", "echo", "float", "cm", "Tricuspid annular plane systolic excursion.", (0.4, 4.0), (1.7, 3.0),
           unit_mistakes=_MM_IN_CM),
    Column("rv_basal_diameter_cm", "echo", "float", "cm", "RV basal diameter.", (1.5, 7.5), (2.5, 4.1),
           unit_mistakes=_MM_IN_CM),
    Column("pericardial_effusion", "echo", "category", "", "Pericardial effusion size.", categories=EFFUSION_GRADES),
    # ECG
    Column("ventricular_rate_bpm", "ecg", "float", "bpm", "Ventricular rate.", (20, 250), (60, 100)),
    Column("atrial_rate_bpm", "ecg", "float", "bpm", "Atrial rate (missing in AF).", (20, 400), (60, 100)),
    Column("pr_interval_ms", "ecg", "float", "ms", "PR interval (missing in AF).", (60, 500), (120, 200),
           unit_mistakes=_S_IN_MS),
    Column("qrs_duration_ms", "ecg", "float", "ms", "QRS duration.", (50, 250), (70, 110), unit_mistakes=_S_IN_MS),
    Column("qt_interval_ms", "ecg", "float", "ms", "QT interval.", (200, 700), None, unit_mistakes=_S_IN_MS),
    Column("qtc_ms", "ecg", "float", "ms", "QTc, Bazett: QT/sqrt(RR).", (250, 700), (350, 460), unit_mistakes=_S_IN_MS),
    Column("qrs_axis_deg", "ecg", "float", "deg", "QRS frontal axis.", (-180, 180), (-30, 90)),
    Column("sokolow_lyon_mv", "ecg", "float", "mV", "Sokolow–Lyon voltage SV1 + max(RV5, RV6).", (0.2, 10), (0, 3.5)),
    Column("ecg_af_flag", "ecg", "flag", "", "Atrial fibrillation or flutter on ECG."),
    Column("ecg_paced_flag", "ecg", "flag", "", "Ventricular pacing on ECG."),
    # labels
    *(Column(name, "label", "flag", "", f"Task label ({LABEL_SHORT[name]}): 1, 0 or missing.") for name in LABELS),
    # concepts
    *(Column(name, "concept", "flag", "", f"NW concept: {measure} outside {lo}–{hi} cm (missing if {measure} is missing).")
      for name, (measure, (lo, hi)) in CONCEPTS.items()),
)

#: Ground-truth columns (prefix ``gt_``): latent truth of the synthetic patient, for analysis only.
GT_COLUMNS: tuple[Column, ...] = (
    Column("gt_cardiac_phase", "gt", "float", "cycle fraction", "Cardiac phase at scan time (0 = end-diastole, ≈0.35 = end-systole)."),
    Column("gt_heart_rate_bpm", "gt", "float", "bpm", "Heart rate during the scan."),
    Column("gt_coronary_agatston", "gt", "float", "AU", "Latent coronary artery calcium (Agatston)."),
    Column("gt_av_agatston", "gt", "float", "AU", "Latent aortic-valve calcium (Agatston)."),
    Column("gt_mac_volume_mm3", "gt", "float", "mm³", "Latent mitral annular calcium volume."),
    Column("gt_heart_volume_ml", "gt", "float", "mL", "Volume inside the epicardium at scan phase (chambers + myocardium; analytic, overlaps of shapes not subtracted)."),
    Column("gt_lv_myocardial_volume_ml", "gt", "float", "mL", "True LV myocardial volume."),
    Column("gt_epicardial_fat_ml", "gt", "float", "mL", "Epicardial fat volume."),
    Column("gt_effusion_thickness_mm", "gt", "float", "mm", "Pericardial effusion rim thickness."),
    Column("gt_pa_diameter_mm", "gt", "float", "mm", "Main pulmonary artery diameter."),
    Column("gt_blood_hu", "gt", "float", "HU", "Blood attenuation, 3·Hb + 3."),
    Column("gt_myocardium_hu", "gt", "float", "HU", "Myocardial attenuation."),
    Column("gt_noise_sd_hu", "gt", "float", "HU", "Image noise SD at the output voxel size."),
    Column("gt_haemoglobin_g_dl", "gt", "float", "g/dL", "Haemoglobin."),
    Column("gt_lvef_percent", "gt", "float", "%", "True LVEF, (EDV−ESV)/EDV of the true volumes, before echo measurement error."),
    Column("gt_lvidd_cm", "gt", "float", "cm", "True LVIDd."),
    Column("gt_lvids_cm", "gt", "float", "cm", "True LVIDs."),
    Column("gt_ivsd_cm", "gt", "float", "cm", "True IVSd."),
    Column("gt_lvpwd_cm", "gt", "float", "cm", "True LVPWd."),
    Column("gt_pasp_mmhg", "gt", "float", "mmHg", "True PASP."),
    Column("gt_rv_edv_ml", "gt", "float", "mL", "True RV end-diastolic volume."),
    Column("gt_la_volume_ml", "gt", "float", "mL", "True LA maximal volume."),
    Column("gt_ra_volume_ml", "gt", "float", "mL", "True RA maximal volume."),
)

ALL_COLUMNS: tuple[Column, ...] = COLUMNS + GT_COLUMNS
COLUMN_BY_NAME: dict[str, Column] = {c.name: c for c in ALL_COLUMNS}
CONCEPT_NAMES: tuple[str, ...] = tuple(CONCEPTS)
REQUIRED_COLUMNS: tuple[str, ...] = ("patient_id", "ct_path", "split")


def columns_in_group(*groups: str) -> list[str]:
    """Names of the manifest columns in the given groups, in schema order."""
    return [c.name for c in ALL_COLUMNS if c.group in groups]


def grade_at_least(grade: str | None, minimum: str, grades: tuple[str, ...] = REGURGITATION_GRADES) -> float:
    """1.0 if ``grade`` is at least ``minimum``, 0.0 if below, NaN if the grade is missing."""
    if grade is None or grade == "" or (isinstance(grade, float) and grade != grade):
        return float("nan")
    return float(grades.index(grade) >= grades.index(minimum))


def schema_markdown() -> str:
    """The manifest column reference as a Markdown table (the body of ``data_cards/manifest_schema.md``)."""
    lines = ["| column | group | kind | unit | allowed / plausible values | reference interval | meaning |",
             "|---|---|---|---|---|---|---|"]
    for c in ALL_COLUMNS:
        if c.kind == "category":
            allowed = ", ".join(f"`{v}`" for v in c.categories)
        elif c.kind == "flag":
            allowed = "`1`, `0`, empty"
        elif c.plausible:
            allowed = f"{c.plausible[0]:g} – {c.plausible[1]:g}"
        else:
            allowed = ""
        normal = f"{c.normal[0]:g} – {c.normal[1]:g}" if c.normal else ""
        lines.append(f"| `{c.name}` | {c.group} | {c.kind} | {c.unit} | {allowed} | {normal} | {c.description} |")
    return "\n".join(lines)
