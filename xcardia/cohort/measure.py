"""What the CT can show: ground-truth CT measurements from a structure label map, and how well each one alone
separates the ten tasks. This is the cohort's realism check (issue: no task above 0.92 except effusion- and
calcium-driven ones; regurgitation below 0.8).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.ndimage import distance_transform_edt

from xcardia.cohort.render import HEART_LABELS, STRUCTURES
from xcardia.schema import LABELS

#: Measurements a reader could take on a non-contrast CT with a perfect segmentation.
CT_MEASUREMENTS: dict[str, str] = {
    "heart_volume_ml": "volume inside the epicardium (myocardium + cavities)",
    "heart_thorax_ratio": "max transverse heart width / max inner thoracic width (whole-chest field of view only)",
    "myocardial_volume_ml": "LV myocardial volume",
    "coronary_calcium_mm3": "coronary calcium volume (voxels ≥ 130 HU)",
    "valve_calcium_mm3": "aortic-valve and mitral-annular calcium volume (voxels ≥ 130 HU)",
    "effusion_volume_ml": "pericardial effusion volume",
    "pa_diameter_mm": "main pulmonary artery diameter (twice the largest inscribed radius)",
}


def ct_measurements(labelmap: np.ndarray, spacing_mm: float | tuple[float, float, float]) -> dict[str, float]:
    """Ground-truth CT measurements of one patient from its structure label map.

    Args:
        labelmap: (X, Y, Z) integer array, axis 0 = patient right→left… as written by the generator (RAS).
        spacing_mm: voxel spacing, scalar or per axis.

    Returns:
        One value per key of :data:`CT_MEASUREMENTS`; ``heart_thorax_ratio`` is NaN when the lungs do not fit in the
        field of view (a heart-centred crop cannot show the thoracic width).
    """
    sp = np.broadcast_to(np.asarray(spacing_mm, dtype=float), (3,))
    voxel_ml = float(np.prod(sp)) / 1000.0
    heart = np.isin(labelmap, HEART_LABELS)
    out = {
        "heart_volume_ml": float(heart.sum()) * voxel_ml,
        "myocardial_volume_ml": float((labelmap == STRUCTURES["lv_myocardium"]).sum()) * voxel_ml,
        "coronary_calcium_mm3": float((labelmap == STRUCTURES["coronary_calcium"]).sum()) * voxel_ml * 1000.0,
        "valve_calcium_mm3": float((labelmap == STRUCTURES["valve_calcium"]).sum()) * voxel_ml * 1000.0,
        "effusion_volume_ml": float((labelmap == STRUCTURES["effusion"]).sum()) * voxel_ml,
    }
    lung = labelmap == STRUCTURES["lung"]
    lung_x = np.flatnonzero(lung.any(axis=(1, 2)))
    heart_x = np.flatnonzero(heart.any(axis=(1, 2)))
    touches_edge = lung_x.size == 0 or lung_x[0] == 0 or lung_x[-1] == labelmap.shape[0] - 1
    if touches_edge or heart_x.size == 0:
        out["heart_thorax_ratio"] = math.nan
    else:
        heart_width = max((np.ptp(np.flatnonzero(heart[:, :, k].any(axis=1))) + 1) for k in range(heart.shape[2])
                          if heart[:, :, k].any())
        thorax_width = max((np.ptp(np.flatnonzero(lung[:, :, k].any(axis=1))) + 1) for k in range(lung.shape[2])
                           if lung[:, :, k].any())
        out["heart_thorax_ratio"] = float(heart_width / thorax_width)
    pa = labelmap == STRUCTURES["pulmonary_artery"]
    out["pa_diameter_mm"] = float(2.0 * distance_transform_edt(pa, sampling=sp).max()) if pa.any() else math.nan
    return out


def oriented_auroc(labels: np.ndarray, scores: np.ndarray) -> tuple[float, int, int]:
    """AUROC of ``scores`` for binary ``labels`` in whichever direction separates better, with n pos/neg.

    Missing labels or scores are left out. Returns NaN when a class is absent.
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels, dtype=float)
    s = np.asarray(scores, dtype=float)
    keep = ~(np.isnan(y) | np.isnan(s))
    y, s = y[keep], s[keep]
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan, n_pos, n_neg
    auc = float(roc_auc_score(y, s))
    return max(auc, 1.0 - auc), n_pos, n_neg


def ct_visibility_table(manifest: pd.DataFrame, measurements: pd.DataFrame) -> pd.DataFrame:
    """For each task, the AUROC of each CT measurement alone and the best one.

    Args:
        manifest: one row per patient with the label columns.
        measurements: same index, one column per CT measurement.

    Returns:
        A DataFrame indexed by task with one AUROC column per measurement, ``best_measurement``, ``best_auroc``,
        ``n_pos`` and ``n_neg``.
    """
    rows = {}
    for task in LABELS:
        row = {}
        for m in measurements.columns:
            row[m], n_pos, n_neg = oriented_auroc(manifest[task].to_numpy(), measurements[m].to_numpy())
        aucs = {m: v for m, v in row.items() if not math.isnan(v)}
        best = max(aucs, key=aucs.get) if aucs else None
        row.update(best_measurement=best, best_auroc=aucs.get(best, math.nan) if best else math.nan, n_pos=n_pos, n_neg=n_neg)
        rows[task] = row
    return pd.DataFrame.from_dict(rows, orient="index")
