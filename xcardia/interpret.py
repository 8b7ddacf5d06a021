"""Interpretability measured against the cohort's ground truth (notebook 03).

The paper claims its alignment guides the latent space towards clinically meaningful axes and shows
cardiac-focused Grad-CAM. On the synthetic cohort every patient's phenotypes and heart are known, so these become
numbers:

- :func:`phenotype_axes` — cross-validated ridge regression from an embedding to each phenotype: out-of-fold R²,
  the axis direction, and the cosine similarity between axes;
- :func:`embedding_2d` — PCA and t-SNE maps with fixed seeds;
- :func:`nw_temperature_sweep` — NW concept predictions, calibration (ECE) and the effective number of supports
  (1/Σw²) as the temperature varies, including the paper's τ = 1 and a τ tuned on validation patients;
- :func:`saliency_heart_share` — the share of positive Grad-CAM / occlusion saliency that falls inside the heart
  (from the label map), against the heart's share of the volume (what uniform saliency would give).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
from torch import nn

from xcardia.cohort.render import HEART_LABELS
from xcardia.losses import nw_predict
from xcardia.metrics import concept_metrics, masked_bce

#: Phenotypes whose latent axes notebook 03 measures (manifest column → short name).
AXIS_PHENOTYPES: dict[str, str] = {
    "lvidd_cm": "LVIDd", "lvids_cm": "LVIDs", "ivsd_cm": "IVSd", "lvpwd_cm": "LVPWd", "lvef_percent": "LVEF",
    "lv_mass_g": "LV mass", "la_diameter_cm": "LA size", "pasp_mmhg": "PASP", "gt_effusion_thickness_mm": "effusion",
    "av_peak_velocity_m_s": "AV Vmax", "gt_heart_volume_ml": "heart volume", "bsa_m2": "BSA",
}


def phenotype_axes(features: np.ndarray, table: pd.DataFrame, phenotypes=tuple(AXIS_PHENOTYPES), folds: int = 5,
                   seed: int = 0) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cross-validated ridge regression from ``features`` (N, D) to each phenotype column of ``table``.

    Returns:
        ``r2`` (one row per phenotype: out-of-fold R², n), ``directions`` (unit-norm axis in the standardised
        feature space, fitted on all patients), ``predictions`` (out-of-fold values, NaN where the phenotype is
        missing).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rows, directions, predictions = [], {}, {}
    alphas = np.logspace(-2, 4, 13)
    for column in phenotypes:
        if column not in table:
            continue
        y = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        keep = ~np.isnan(y)
        prediction = np.full(len(y), np.nan)
        if keep.sum() < max(folds * 2, 10) or np.nanstd(y) == 0:
            rows.append({"phenotype": column, "r2": math.nan, "n": int(keep.sum())})
            continue
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=alphas))
        cv = KFold(n_splits=folds, shuffle=True, random_state=seed)
        prediction[keep] = cross_val_predict(model, features[keep], y[keep], cv=cv)
        rows.append({"phenotype": column, "r2": float(r2_score(y[keep], prediction[keep])), "n": int(keep.sum())})
        coef = model.fit(features[keep], y[keep])[-1].coef_
        directions[column] = coef / (np.linalg.norm(coef) or 1.0)
        predictions[column] = prediction
    return pd.DataFrame(rows), directions, predictions


def axis_cosines(directions: dict[str, np.ndarray]) -> pd.DataFrame:
    """Cosine similarity between phenotype axes (1 = the same direction in feature space)."""
    names = list(directions)
    m = np.array([[float(directions[a] @ directions[b]) for b in names] for a in names])
    return pd.DataFrame(m, index=names, columns=names)


def embedding_2d(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D map of standardised features: ``pca`` or ``tsne`` (fixed ``random_state``)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(features)
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        perplexity = float(min(30, max(5, (len(x) - 1) // 3)))
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def cross_modal_pca(image: np.ndarray, tabular: np.ndarray, seed: int = 0) -> dict:
    """The public code's cross-modal figure (``Finetune/PCA_visual.py:196-222``): image and tabular embeddings of
    the same patients stacked, standardised and projected on two principal components.

    Beyond the public script, two numbers to read it by: ``modality_gap`` — the distance between the two modalities'
    centroids in the 2-D map over the map's mean within-modality SD (0: the modalities overlap; large: two clouds) —
    and ``matched_cosine`` / ``unmatched_cosine`` — the mean cosine similarity of a patient's own image and tabular
    embeddings versus another patient's, in the original space (what the CLIP loss pulls apart).

    Args:
        image, tabular: (N, D) embeddings of the same N patients, row for row.

    Returns:
        ``{"coords" (2N, 2), "modality" (2N,) of "image"/"tabular", "explained_variance" (2,), "modality_gap",
        "matched_cosine", "unmatched_cosine"}``.
    """
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(np.vstack([image, tabular]))
    pca = PCA(n_components=2, random_state=seed)
    coords = pca.fit_transform(x)
    n = len(image)
    modality = np.array(["image"] * n + ["tabular"] * len(tabular))
    a, b = coords[:n], coords[n:]
    spread = float(np.sqrt((a.var(axis=0).sum() + b.var(axis=0).sum()) / 2))
    unit = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True).clip(1e-12)  # noqa: E731
    cos = unit(np.asarray(image, dtype=float)) @ unit(np.asarray(tabular, dtype=float)).T
    off = ~np.eye(n, dtype=bool)
    return {"coords": coords, "modality": modality, "explained_variance": pca.explained_variance_ratio_,
            "modality_gap": float(np.linalg.norm(a.mean(0) - b.mean(0)) / spread) if spread > 0 else float("nan"),
            "matched_cosine": float(np.diag(cos).mean()), "unmatched_cosine": float(cos[off].mean())}


def effective_supports(weights: torch.Tensor | np.ndarray) -> np.ndarray:
    """Effective number of supports per query, 1 / Σ_j w_j² (S for uniform weights, 1 for one-hot)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return (1.0 / (w**2).sum(dim=1)).numpy()


def nw_temperature_sweep(support_emb: np.ndarray, support_targets: np.ndarray, queries: dict[str, np.ndarray],
                         targets: dict[str, np.ndarray], temperatures) -> pd.DataFrame:
    """NW concept AUROC, ECE, BCE and effective supports for each temperature and each query set.

    Args:
        support_emb, support_targets: the bank (S, D) and its concept targets (S, C).
        queries, targets: per split name (e.g. ``val``, ``test``) the query embeddings (N, D) and targets (N, C).
        temperatures: τ values to sweep.
    """
    rows = []
    bank = torch.as_tensor(support_emb, dtype=torch.float32)
    bank_targets = torch.as_tensor(support_targets, dtype=torch.float32)
    for tau in temperatures:
        for split, q in queries.items():
            pred, weights = nw_predict(torch.as_tensor(q, dtype=torch.float32), bank, bank_targets, float(tau))
            p, y = pred.numpy(), targets[split]
            scores = concept_metrics(p, y)
            rows.append({"tau": float(tau), "split": split, "concept_auroc": scores["concept_auroc"],
                         "ece": scores["concept_ece"], "bce": masked_bce(y, p),
                         "effective_supports": float(np.mean(effective_supports(weights))),
                         "bank_size": int(len(bank))})
    return pd.DataFrame(rows)


def reliability_curve(y_true: np.ndarray, probability: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Per probability bin: mean predicted probability, observed frequency and count (observed entries only)."""
    y, p = np.asarray(y_true, float).ravel(), np.asarray(probability, float).ravel()
    keep = ~np.isnan(y) & ~np.isnan(p)
    y, p = y[keep], p[keep]
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    rows = [{"bin": b, "confidence": float(p[bins == b].mean()), "frequency": float(y[bins == b].mean()),
             "count": int((bins == b).sum())} for b in range(n_bins) if (bins == b).any()]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ saliency
def heart_share(saliency: np.ndarray, heart: np.ndarray) -> float:
    """Share of the positive saliency mass inside ``heart`` (bool, same shape): Σ_heart s⁺ / Σ s⁺.
    NaN when the map has no positive mass."""
    s = np.clip(np.asarray(saliency, dtype=float), 0, None)
    total = s.sum()
    return float(s[np.asarray(heart, dtype=bool)].sum() / total) if total > 0 else math.nan


class FineTunedModel(nn.Module):
    """The frozen trunk of an encoder and a fine-tuned top (:class:`xcardia.finetune.TopModel`), returning the
    logit of one task — what Grad-CAM and occlusion sensitivity explain."""

    def __init__(self, encoder, top, task_index: int):
        super().__init__()
        self.encoder = encoder
        self.top = top
        self.task_index = task_index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.encoder.trunk(x))[:, self.task_index: self.task_index + 1]


def saliency_maps(model: FineTunedModel, volumes: torch.Tensor, target_layer: str = "encoder.backbone.layer3",
                  occlusion_mask: int = 8) -> dict[str, np.ndarray]:
    """Grad-CAM (MONAI, at ``target_layer`` — the last stage is only 2³ cells at 32³ input — upsampled) and
    occlusion sensitivity (MONAI; the drop of the logit when a cube is replaced by the image mean) for each volume
    (N, 1, X, Y, Z)."""
    import warnings

    from monai.visualize import GradCAM, OcclusionSensitivity

    model.eval()
    grad_cam = GradCAM(nn_module=model, target_layers=target_layer)
    occlusion = OcclusionSensitivity(nn_module=model, mask_size=occlusion_mask, n_batch=32, overlap=0.5,
                                     mode="mean_img", verbose=False, activate=False)
    cams, occl = [], []
    for v in volumes:
        x = v[None]
        cams.append(grad_cam(x, class_idx=0).detach().numpy()[0, 0])
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MONAI 1.6 indexes with lists (a torch deprecation)
            baseline = float(model(x)[0, 0])
            occ = occlusion(x)[0].numpy()[0, 0]
        occ = occ[..., 0] if occ.ndim == 4 else occ  # a trailing class axis for multi-output models
        occl.append(baseline - occ)  # > 0 where hiding the region lowers the logit
    return {"gradcam": np.stack(cams), "occlusion": np.stack(occl)}


def heart_regions(labelmaps: np.ndarray) -> dict[str, np.ndarray]:
    """``heart`` (myocardium and cavities) and ``heart and border`` (dilated by one voxel: the silhouette against
    fat and lung, which is what a non-contrast CT shows)."""
    from scipy.ndimage import binary_dilation

    heart = np.isin(labelmaps, HEART_LABELS)
    border = np.stack([binary_dilation(h, iterations=1) for h in heart])
    return {"heart": heart, "heart and border": border}


def heart_share_table(maps: dict[str, np.ndarray], labelmaps: np.ndarray, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per saliency method and region: mean share of positive saliency inside the region with a bootstrap CI over
    patients, and the region's mean share of the volume (what uniform saliency would give)."""
    rows = []
    for region, masks in heart_regions(labelmaps).items():
        for method, m in maps.items():
            rng = np.random.default_rng(seed)
            shares = np.array([heart_share(s, h) for s, h in zip(m, masks)])
            shares = shares[~np.isnan(shares)]
            boots = [np.mean(rng.choice(shares, size=len(shares))) for _ in range(n_boot)] if len(shares) else [math.nan]
            rows.append({"method": method, "region": region,
                         "saliency_share": float(np.mean(shares)) if len(shares) else math.nan,
                         "ci_low": float(np.quantile(boots, 0.025)), "ci_high": float(np.quantile(boots, 0.975)),
                         "volume_share": float(masks.mean()), "n_patients": int(len(shares))})
    return pd.DataFrame(rows)


def init_features(source: str, manifest: pd.DataFrame, rows: np.ndarray, profile, cache_dir, seed: int = 0) -> np.ndarray:
    """128-d image features of ``rows`` under an init (``scratch`` = seeded random weights, or a run/encoder)."""
    from xcardia.data.dataset import CohortDataset
    from xcardia.data.imaging import PreprocessCache
    from xcardia.finetune import build_init, encode

    encoder = build_init(str(source), profile.model.image, profile.preprocess, seed)
    dataset = CohortDataset(manifest, rows, PreprocessCache(cache_dir, profile.preprocess), None, None, 0)
    return encode(str(source), encoder, dataset).features


# ------------------------------------------------------------------------------------------ notebook-level studies
def latent_axes_by_init(features: dict[str, np.ndarray], table: pd.DataFrame, seed: int = 0):
    """R² (inits × phenotypes), axis directions and out-of-fold predictions for every init."""
    r2, directions, predictions = {}, {}, {}
    for name, x in features.items():
        table_r2, directions[name], predictions[name] = phenotype_axes(x, table, seed=seed)
        r2[name] = table_r2.set_index("phenotype")["r2"]
    wide = pd.DataFrame(r2).T
    wide.columns = [AXIS_PHENOTYPES.get(c, c) for c in wide.columns]
    return wide, directions, predictions


def traversal_positions(values: np.ndarray, n: int = 6) -> np.ndarray:
    """Positions of the patients nearest to evenly spaced quantiles (5 % to 95 %) of ``values`` (NaN skipped)."""
    known = np.flatnonzero(~np.isnan(values))
    targets = np.quantile(values[known], np.linspace(0.05, 0.95, n))
    return np.array([known[np.argmin(np.abs(values[known] - t))] for t in targets])


def nw_explanations(run_dir, manifest: pd.DataFrame, n_queries: int = 3, top: int = 3, cache_dir=None,
                    seed: int = 0, positions=None) -> list[dict]:
    """For test patients chosen at random (seeded), or at ``positions`` among the test patients: the run's NW
    prediction from its selected epoch's bank, and the supports with the largest weights (manifest rows, weights,
    concept targets)."""
    from xcardia.embeddings import embed_run, load_run_model, run_bank
    from xcardia.models.xcardia_model import XCardiaModel

    model, _, config = load_run_model(run_dir)
    bank = run_bank(run_dir)  # the selected epoch's bank, unfilled queue slots dropped
    test = embed_run(run_dir, manifest, ("test",), cache_dir)
    query = XCardiaModel.nw_query(torch.as_tensor(test["image"]), torch.as_tensor(test["tabular"]),
                                  config["pretrain"]["nw_query"])
    tau = model.nw_temperature().item()
    pred, weights = nw_predict(query, bank.embeddings, bank.targets, tau)
    chosen = (np.asarray(positions, dtype=int) if positions is not None else
              np.random.default_rng(seed).choice(len(query), size=min(n_queries, len(query)), replace=False))
    out = []
    for q in chosen:
        order = torch.argsort(weights[q], descending=True)[:top].numpy()
        out.append({"row": int(test["rows"][q]), "prediction": pred[q].numpy(), "truth": test["concepts"][q],
                    "supports": [{"row": int(bank.indices[j]), "weight": float(weights[q, j]),
                                  "concepts": bank.targets[j].numpy()} for j in order],
                    "tau": tau, "bank_rows": bank.indices.tolist()})
    return out


def calibration_study(run_dir, manifest: pd.DataFrame, cache_dir=None,
                      temperatures=(0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)) -> dict:
    """NW calibration of a run's selected epoch (model and bank of that epoch) at the paper's τ = 1, the run's own τ, and a τ tuned on validation
    patients (lowest BCE); ECE and effective supports over a τ grid, on validation and test patients."""
    from xcardia.embeddings import embed_run, load_run_model, run_bank
    from xcardia.models.xcardia_model import XCardiaModel

    model, _, config = load_run_model(run_dir)
    bank = run_bank(run_dir)
    mode = config["pretrain"]["nw_query"]
    queries, targets = {}, {}
    for split in ("val", "test"):
        e = embed_run(run_dir, manifest, (split,), cache_dir)
        queries[split] = XCardiaModel.nw_query(torch.as_tensor(e["image"]), torch.as_tensor(e["tabular"]), mode).numpy()
        targets[split] = e["concepts"]
    learned = model.nw_temperature().item()
    grid = sorted(set(float(t) for t in temperatures) | {learned})
    sweep = nw_temperature_sweep(bank.embeddings.numpy(), bank.targets.numpy(), queries, targets, grid)
    val = sweep[sweep["split"] == "val"]
    tuned = float(val.loc[val["bce"].idxmin(), "tau"])
    curves = {}
    for name, tau in (("paper τ = 1", 1.0), (f"run τ = {learned:.3g}", learned), (f"tuned τ = {tuned:.3g}", tuned)):
        pred, _ = nw_predict(torch.as_tensor(queries["test"]), bank.embeddings, bank.targets, tau)
        curves[name] = reliability_curve(targets["test"], pred.numpy())
    return {"sweep": sweep, "learned_tau": learned, "tuned_tau": tuned, "curves": curves}


def heart_label_volumes(manifest: pd.DataFrame, rows: np.ndarray, preprocess) -> np.ndarray:
    """Ground-truth heart regions on the preprocessed voxels of ``rows``: the synthetic cohort's structure label maps
    (``labelmap_path``), or a real cohort's binary heart masks (``heart_mask_path``, e.g. TotalSegmentator's
    ``heart.nii.gz``) brought onto the same voxels as the CT (same reorientation, spacing and crop) and written with
    the first heart label, so both feed :func:`heart_share_table` alike."""
    import nibabel as nib

    from xcardia.data.imaging import preprocess_mask
    from xcardia.data.manifest import resolve_ct_path

    if "labelmap_path" in manifest and manifest["labelmap_path"].notna().all():
        return np.stack([np.asarray(nib.load(str(resolve_ct_path(manifest, manifest["labelmap_path"].iloc[int(r)]))).dataobj)
                         for r in rows])
    if "heart_mask_path" in manifest and manifest["heart_mask_path"].notna().all():
        out = []
        for r in rows:
            ct = resolve_ct_path(manifest, manifest["ct_path"].iloc[int(r)])
            mask = resolve_ct_path(manifest, manifest["heart_mask_path"].iloc[int(r)])
            out.append(np.where(preprocess_mask(ct, mask, preprocess, mask), HEART_LABELS[0], 0))
        return np.stack(out)
    raise ValueError("saliency inside the heart needs label maps (synthetic) or a heart_mask_path column (real cohort)")


def saliency_study(profile, manifest: pd.DataFrame, inits: dict[str, str], cache_dir, task: str = "lvwt_gte_13_flag",
                   n_patients: int = 40, seed: int = 0, n_boot: int = 1000, progress: bool = False) -> dict:
    """Fine-tune each init for ``task`` (the paper's protocol, all training labels), explain its test predictions
    with Grad-CAM and occlusion, and measure the share of saliency inside the heart (label maps of the synthetic
    cohort, or a real cohort's heart masks: :func:`heart_label_volumes`). ``progress``: a text bar over the inits
    (minutes on the ``cpu`` profile)."""
    from xcardia.finetune import prepare_experiment, train_top
    from xcardia.schema import LABELS

    exp = prepare_experiment(profile, manifest, inits, cache_dir, profile.finetune, seed, log=lambda *_: None)
    test = exp.rows["test"]
    chosen = np.sort(np.random.default_rng(seed).choice(test, size=min(n_patients, len(test)), replace=False))
    volumes = torch.as_tensor(np.stack([exp.datasets["test"].image(int(np.searchsorted(test, r))) for r in chosen]))[:, None]
    labelmaps = heart_label_volumes(manifest, chosen, profile.preprocess)
    if labelmaps.shape[1:] != volumes.shape[2:]:
        raise ValueError("label maps and preprocessed CTs differ in shape; saliency needs the cohort's own geometry")
    task_index = LABELS.index(task)
    tables, examples = [], {}
    from xcardia.progress import bar

    for name, init in bar(exp.inits.items(), desc="saliency (fine-tune + Grad-CAM + occlusion per init)",
                          disable=not progress, total=len(exp.inits)):
        top = train_top(init, exp.labels, exp.rows["train"], exp.rows["val"], profile.finetune, seed=123)
        model = FineTunedModel(init.encoder, top, task_index)
        maps = saliency_maps(model, volumes)
        tables.append(heart_share_table(maps, labelmaps, n_boot=n_boot, seed=seed).assign(init=name))
        examples[name] = {method: m[0] for method, m in maps.items()}
    lo, hi = profile.preprocess.hu_window  # the network's input is the HU window mapped to [−1, 1]: back to HU,
    hu = lo + (volumes[0, 0].numpy() + 1.0) / 2.0 * (hi - lo)  # so that figures window it like every other CT
    return {"table": pd.concat(tables, ignore_index=True), "examples": examples, "rows": chosen,
            "volume": hu.astype(np.float32), "heart": np.isin(labelmaps[0], HEART_LABELS)}
