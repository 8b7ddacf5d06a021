"""Tabular (ECHO + ECG) encoders and their preprocessing.

- :class:`TabularPreprocessor` turns manifest columns into a standardised (N, F) matrix: categories become
  ordinals (sex M=1/F=0, regurgitation grades 0–4, effusion 0–3); mean and SD are fitted on the pretraining
  split only. Missing values stay NaN for learned missing-value tokens (default) or are KNN-imputed (the paper:
  k = 5; here fitted on the pretraining split only and then applied to the others — the public code fitted a
  separate imputer on every split).
- :class:`FeatureTokenTransformer` is the paper's encoder: each feature j becomes a token x_j·W_j + b_j (or a
  learned missing token M_j), then a pre-LN transformer (d = 256, 3 layers, 8 heads), mean pooling, LayerNorm
  and a linear map.
- :class:`TabularMLP` is the lighter option: values with missing indicators through an MLP.
- :func:`scarf_corrupt` is SCARF-style augmentation (Bahri et al., ICLR 2022): a random subset of each row's
  features is replaced by the same features of other rows of the batch.

Which columns feed the encoder is configuration. :data:`DEFAULT_TABULAR_COLUMNS` are the paper's inputs (its
public code's ``structured_cols``) as far as the synthetic cohort simulates them — see
:data:`PAPER_STRUCTURED_COLUMNS` and ``data_cards/synthetic_cohort.md``. Regurgitation grades (they define four
labels; the paper has none), the four NW concept measurements and everything computed from them are not inputs.
:data:`EXTENDED_TABULAR_COLUMNS` (every echo/ECG/demographic column but the concepts and their derivatives) is an
opt-in variant, not the paper's setting.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import torch
from torch import nn

from xcardia.schema import (
    COLUMN_BY_NAME,
    CONCEPTS,
    EFFUSION_GRADES,
    REGURGITATION_GRADES,
    columns_in_group,
)

CONCEPT_DERIVED = ("lv_edv_ml", "lv_esv_ml", "lv_mass_g", "lv_mass_index_g_m2")

#: The paper's tabular input: its public code's 46 ``structured_cols`` in their order, each mapped to this
#: project's column, or to None where the synthetic cohort does not simulate it (race, prosthetic-valve and VAD
#: flags, LVOT mean velocity and gradients, the site-less e′, the mean a′, the E/A "calculated" flag).
PAPER_STRUCTURED_COLUMNS: tuple[tuple[str, str | None], ...] = (
    ("ECHO_lvef_value", "lvef_percent"),
    ("vad_flag", None),
    ("Patients_Age", "age_years"),
    ("Patients_Sex", "sex"),
    ("race_1_x", None),
    ("e_wave_velocity", "mv_e_velocity_cm_s"),
    ("a_wave_velocity", "mv_a_velocity_cm_s"),
    ("e_a_ratio", "mv_e_a_ratio"),
    ("valve_prosthetic_flag", None),
    ("aortic_valve_prosthetic_flag", None),
    ("mitral_valve_prosthetic_flag", None),
    ("tricuspid_valve_prosthetic_flag", None),
    ("pulmonary_valve_prosthetic_flag", None),
    ("ventricular_rate", "ventricular_rate_bpm"),
    ("atrial_rate", "atrial_rate_bpm"),
    ("pr_interval", "pr_interval_ms"),
    ("qrs_duration", "qrs_duration_ms"),
    ("qt_inverval", "qt_interval_ms"),
    ("qt_corrected", "qtc_ms"),
    ("ventricular_pacing_flag", "ecg_paced_flag"),
    ("ECHO_tr_max_velocity_value", "tr_max_velocity_m_s"),
    ("ECHO_pericardial_effusion_value", "pericardial_effusion"),
    ("ECHO_pasp_value", "pasp_mmhg"),
    ("ECHO_pasp_less_rap_value", "pasp_minus_rap_mmhg"),
    ("ECHO_rap_value", "rap_mmhg"),
    ("ECHO_lvot_area_value", "lvot_area_cm2"),
    ("ECHO_lvot_diameter_value", "lvot_diameter_cm"),
    ("ECHO_lvot_vmax_value", "lvot_peak_velocity_m_s"),
    ("ECHO_lvot_vmean_value", None),
    ("ECHO_lvot_peak_gradient_value", None),
    ("ECHO_lvot_mean_gradient_value", None),
    ("ECHO_lvot_vti_value", "lvot_vti_cm"),
    ("ECHO_mr_vti", "mr_vti_cm"),
    ("ECHO_mr_peak_velocity", "mr_peak_velocity_m_s"),
    ("ECHO_mv_dti_e_prime", None),
    ("ECHO_mv_dti_e_prime_lateral", "e_prime_lateral_cm_s"),
    ("ECHO_mv_dti_e_prime_medial", "e_prime_septal_cm_s"),
    ("ECHO_mv_dti_e_prime_avg", "e_prime_mean_cm_s"),
    ("ECHO_mv_dti_a_prime_lateral", "a_prime_lateral_cm_s"),
    ("ECHO_mv_dti_a_prime_medial", "a_prime_septal_cm_s"),
    ("ECHO_mv_dti_a_prime_avg", None),
    ("ECHO_e_a_ratio_calc_flag", None),
    ("ECHO_av_mean_gradient", "av_mean_gradient_mmhg"),
    ("ECHO_av_peak_gradient", "av_peak_gradient_mmhg"),
    ("ECHO_av_peak_velocity", "av_peak_velocity_m_s"),
    ("ECHO_av_vti", "av_vti_cm"),
)

#: The encoder's default input: the paper's columns the cohort simulates, in the paper's order.
DEFAULT_TABULAR_COLUMNS: tuple[str, ...] = tuple(ours for _, ours in PAPER_STRUCTURED_COLUMNS if ours is not None)
PAPER_TABULAR_COLUMNS = DEFAULT_TABULAR_COLUMNS

#: Opt-in variant (not the paper's input): every demographic, echo and ECG column except the concept measurements
#: and what is computed from them — regurgitation grades, LA/RV size, TAPSE, Sokolow–Lyon, body size included.
EXTENDED_TABULAR_COLUMNS: tuple[str, ...] = tuple(
    c for c in columns_in_group("demographics", "echo", "ecg")
    if c not in {m for m, _ in CONCEPTS.values()} and c not in CONCEPT_DERIVED
)
TABULAR_COLUMN_SETS = {"paper": PAPER_TABULAR_COLUMNS, "extended": EXTENDED_TABULAR_COLUMNS}


def _ordinal(column: str, values: pd.Series) -> np.ndarray:
    spec = COLUMN_BY_NAME.get(column)
    if spec is not None and spec.kind == "category":
        vocabulary = {"sex": {"M": 1.0, "F": 0.0}}.get(column) or {
            g: float(i) for i, g in enumerate(EFFUSION_GRADES if column == "pericardial_effusion" else REGURGITATION_GRADES)
        }
        return np.array([vocabulary.get(v, math.nan) if isinstance(v, str) else math.nan for v in values], dtype=float)
    return pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)


class TabularPreprocessor:
    """Columns → standardised float matrix, fitted on the pretraining split.

    Args:
        columns: manifest columns to use (absent columns are all-missing features).
        missing: ``"token"`` (keep NaN; the encoder learns a missing token per feature) or ``"knn"`` (impute).
        knn_neighbors: k of the KNN imputer (paper: 5).
    """

    def __init__(self, columns: tuple[str, ...] = DEFAULT_TABULAR_COLUMNS, missing: str = "token", knn_neighbors: int = 5):
        if missing not in ("token", "knn"):
            raise ValueError(f"missing must be 'token' or 'knn', got {missing!r}")
        self.columns = tuple(columns)
        self.missing = missing
        self.knn_neighbors = knn_neighbors
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self.knn_fit: np.ndarray | None = None
        self._imputer = None

    def raw(self, df: pd.DataFrame) -> np.ndarray:
        out = np.full((len(df), len(self.columns)), np.nan)
        for j, col in enumerate(self.columns):
            if col in df:
                out[:, j] = _ordinal(col, df[col])
        return out

    def fit(self, df: pd.DataFrame) -> "TabularPreprocessor":
        x = self.raw(df)
        with warnings.catch_warnings():  # an all-missing column has no mean: it gets 0 and SD 1
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(x, axis=0)
            std = np.nanstd(x, axis=0)
        self.mean = np.nan_to_num(mean)
        self.std = np.where(np.isfinite(std) & (std > 1e-8), std, 1.0)
        if self.missing == "knn":
            self.knn_fit = (x - self.mean) / self.std
        return self

    def _knn(self):
        if self._imputer is None:
            from sklearn.impute import KNNImputer

            self._imputer = KNNImputer(n_neighbors=self.knn_neighbors, keep_empty_features=True).fit(self.knn_fit)
        return self._imputer

    def transform(self, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """``(values (N, F) float32, missing (N, F) bool)``; in KNN mode values are imputed and nothing is missing."""
        if self.mean is None:
            raise RuntimeError("fit the preprocessor on the pretraining split first")
        z = (self.raw(df) - self.mean) / self.std
        missing = np.isnan(z)
        if self.missing == "knn":
            z = self._knn().transform(z)
            missing = np.zeros_like(missing)
        return z.astype(np.float32), missing

    def state_dict(self) -> dict:
        return {"columns": list(self.columns), "missing": self.missing, "knn_neighbors": self.knn_neighbors,
                "mean": torch.as_tensor(self.mean), "std": torch.as_tensor(self.std),
                "knn_fit": None if self.knn_fit is None else torch.as_tensor(self.knn_fit)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "TabularPreprocessor":
        pre = cls(tuple(state["columns"]), state["missing"], int(state["knn_neighbors"]))
        pre.mean = state["mean"].numpy()
        pre.std = state["std"].numpy()
        pre.knn_fit = None if state["knn_fit"] is None else state["knn_fit"].numpy()
        return pre


class FeatureTokenTransformer(nn.Module):
    """The paper's per-feature-token transformer.

    Args:
        n_features: F.
        d_model: token size (paper: 256).
        n_layers: transformer layers (paper: 3).
        n_heads: attention heads (paper: 8).
        ff_dim: feed-forward size (paper: 1024).
        out_dim: output size (paper: 256).

    Shapes: values (B, F) with NaN or any value where ``missing`` (B, F) is True → (B, out_dim).
    """

    def __init__(self, n_features: int, d_model: int = 256, n_layers: int = 3, n_heads: int = 8, ff_dim: int = 1024,
                 out_dim: int = 256, dropout: float = 0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_features, d_model))
        self.bias = nn.Parameter(torch.zeros(n_features, d_model))
        self.missing_token = nn.Parameter(torch.randn(n_features, d_model) * 0.02)
        nn.init.xavier_uniform_(self.weight)
        layer = nn.TransformerEncoderLayer(d_model, n_heads, ff_dim, dropout=dropout, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.head = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, out_dim))
        self.out_dim = out_dim

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        tokens = torch.nan_to_num(values)[..., None] * self.weight + self.bias
        tokens = torch.where(missing[..., None], self.missing_token.expand_as(tokens), tokens)
        return self.head(self.transformer(tokens).mean(dim=1))


class TabularMLP(nn.Module):
    """Values (missing → 0) concatenated with missing indicators, through a two-hidden-layer MLP."""

    def __init__(self, n_features: int, hidden: int = 256, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * n_features, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))
        self.out_dim = out_dim

    def forward(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        filled = torch.where(missing, torch.zeros_like(values), torch.nan_to_num(values))
        return self.net(torch.cat([filled, missing.to(values.dtype)], dim=1))


def scarf_corrupt(values: torch.Tensor, missing: torch.Tensor, rate: float,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace a random ``rate`` share of each row's features by the same feature of a random other row."""
    if rate <= 0:
        return values, missing
    b, f = values.shape
    corrupt = torch.rand(b, f, generator=generator, device=values.device) < rate
    donors = torch.randint(0, b, (b, f), generator=generator, device=values.device)
    cols = torch.arange(f, device=values.device).expand(b, f)
    return (torch.where(corrupt, values[donors, cols], values),
            torch.where(corrupt, missing[donors, cols], missing))
