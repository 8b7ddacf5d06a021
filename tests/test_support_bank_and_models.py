"""Support banks, encoders, tabular preprocessing and encoder weight files."""

from __future__ import annotations

from collections import deque

import numpy as np
import pandas as pd
import pytest
import torch

from xcardia.errors import XcardiaError
from xcardia.losses import nw_predict
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec
from xcardia.models.tabular_encoder import (
    DEFAULT_TABULAR_COLUMNS,
    FeatureTokenTransformer,
    TabularMLP,
    TabularPreprocessor,
    scarf_corrupt,
)
from xcardia.models.weights import load_encoder, load_encoder_state, save_encoder
from xcardia.models.xcardia_model import ModelSpec, XCardiaModel
from xcardia.support_bank import QueueBank, batch_bank, build_kmeans_bank, kmeans_exemplars

SMALL = ImageEncoderSpec(arch="resnet10", widths=(8, 16, 16, 32), conv1_size=3, conv1_stride=2, max_pool=False)


# ----------------------------------------------------------------------------- support banks
def test_kmeans_exemplars_pick_k_per_concept_among_observed_positives_only():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(60, 4))
    concepts = np.full((60, 2), np.nan)
    concepts[:10, 0] = 1.0          # ten positives of concept 0
    concepts[10:40, 0] = 0.0
    concepts[40:, 0] = np.nan       # missing: must never count as positive (the public code's defect)
    concepts[:, 1] = 0.0
    concepts[50:53, 1] = 1.0        # three positives of concept 1: fewer than k
    picks = kmeans_exemplars(emb, concepts, k_per_concept=5, seed=0)
    assert set(picks) <= set(range(10)) | {50, 51, 52}
    assert len(set(picks) & set(range(10))) == 5 and {50, 51, 52} <= set(picks)
    assert np.array_equal(picks, kmeans_exemplars(emb, concepts, 5, 0))  # seeded


def test_kmeans_exemplars_are_the_points_closest_to_the_centres():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 3))
    concepts = np.ones((40, 1))
    picks = kmeans_exemplars(emb, concepts, k_per_concept=4, seed=7)
    centres = KMeans(n_clusters=4, n_init=10, random_state=7).fit(emb).cluster_centers_
    expected = sorted({int(np.argmin(((emb - c) ** 2).sum(1))) for c in centres})
    assert list(picks) == expected


def test_kmeans_bank_falls_back_to_random_patients_without_positives():
    picks = kmeans_exemplars(np.zeros((20, 2)), np.zeros((20, 4)), fallback=8, seed=0)
    assert len(picks) == 8 and len(set(picks)) == 8


def test_single_process_kmeans_bank_drops_sampler_duplicates():
    emb = torch.randn(12, 3, generator=torch.Generator().manual_seed(0))
    tgt = torch.ones(12, 1)
    idx = torch.arange(12)
    bank = build_kmeans_bank(torch.cat([emb, emb[:2]]), torch.cat([tgt, tgt[:2]]), torch.cat([idx, idx[:2]]), 3)
    reference = build_kmeans_bank(emb, tgt, idx, 3)
    torch.testing.assert_close(bank.embeddings, reference.embeddings)
    assert len(set(bank.indices.tolist())) == len(bank)


def test_queue_bank_is_a_fifo_of_the_most_recent_entries():
    queue = QueueBank(size=7, dim=2, n_targets=1)
    reference = deque(maxlen=7)
    g = torch.Generator().manual_seed(2)
    counter = 0
    for n in (3, 2, 4, 9, 1):
        emb = torch.randn(n, 2, generator=g)
        idx = torch.arange(counter, counter + n)
        counter += n
        queue.enqueue(emb, idx[:, None].float(), idx)
        reference.extend(zip(idx.tolist(), emb))
        bank = queue.bank()
        assert bank.indices.tolist() == [i for i, _ in reference]
        torch.testing.assert_close(bank.embeddings, torch.stack([e for _, e in reference]))
    state = queue.state_dict()
    other = QueueBank(7, 2, 1)
    other.load_state_dict(state)
    assert other.bank().indices.tolist() == queue.bank().indices.tolist()


def test_batch_bank_leaves_each_query_out():
    emb = torch.randn(5, 3)
    bank, exclude = batch_bank(emb, torch.ones(5, 1))
    _, weights = nw_predict(emb, bank.embeddings, bank.targets, 0.5, exclude=exclude)
    assert (weights.diagonal() == 0).all()


# ----------------------------------------------------------------------------- image encoder
@pytest.mark.parametrize("arch, pooled", [("resnet10", 32), ("resnet18", 32), ("resnet50", 128)])
def test_image_encoder_gives_the_128d_feature(arch, pooled):
    enc = ImageEncoder(ImageEncoderSpec(arch=arch, widths=(8, 16, 16, 32), conv1_size=3, conv1_stride=2, max_pool=False))
    x = torch.randn(2, 1, 24, 24, 24)
    assert enc.pooled_dim == pooled
    enc.eval()
    out = enc(x)
    assert out.shape == (2, 128)
    torch.testing.assert_close(enc.top(enc.trunk(x)), out)


@pytest.mark.parametrize("norm, kind", [("instance", torch.nn.InstanceNorm3d), ("group", torch.nn.GroupNorm)])
def test_batch_independent_norm_reaches_every_block(norm, kind):
    enc = ImageEncoder(ImageEncoderSpec(arch="resnet18", widths=(8, 16, 16, 32), conv1_size=3, max_pool=False, norm=norm))
    norms = [m for m in enc.modules() if isinstance(m, (torch.nn.BatchNorm3d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, kind) for m in norms)
    enc.eval()
    x = torch.randn(3, 1, 24, 24, 24)
    torch.testing.assert_close(enc(x)[:1], enc(x[:1]))  # a sample's features do not depend on its batch


def test_unknown_architecture_is_refused():
    with pytest.raises(XcardiaError, match="resnet"):
        ImageEncoder(ImageEncoderSpec(arch="vgg16"))


# ----------------------------------------------------------------------------- tabular
def test_default_tabular_columns_exclude_concept_measurements_and_their_derivatives():
    for col in ("ivsd_cm", "lvpwd_cm", "lvidd_cm", "lvids_cm", "lv_edv_ml", "lv_esv_ml", "lv_mass_g"):
        assert col not in DEFAULT_TABULAR_COLUMNS
    assert "lvef_percent" in DEFAULT_TABULAR_COLUMNS and "qrs_duration_ms" in DEFAULT_TABULAR_COLUMNS


def test_default_tabular_columns_are_the_papers_and_define_no_label():
    """Issue 11: the paper's structured_cols as far as simulated; no regurgitation grade (they define four labels),
    nothing the paper's table lacks."""
    from xcardia.schema import COLUMN_BY_NAME
    from xcardia.models.tabular_encoder import PAPER_STRUCTURED_COLUMNS

    mapped = [ours for _, ours in PAPER_STRUCTURED_COLUMNS if ours is not None]
    assert DEFAULT_TABULAR_COLUMNS == tuple(mapped) and len(set(mapped)) == len(mapped)
    assert all(c in COLUMN_BY_NAME for c in mapped)
    for absent in ("ar_grade", "mr_grade", "tr_grade", "pr_grade", "la_diameter_cm", "la_volume_index_ml_m2",
                   "rv_basal_diameter_cm", "tapse_cm", "sokolow_lyon_mv", "height_cm", "weight_kg", "bmi_kg_m2",
                   "bsa_m2", "qrs_axis_deg", "ecg_af_flag", "e_e_prime_ratio"):
        assert absent not in DEFAULT_TABULAR_COLUMNS, absent


def test_generated_cohort_writes_every_default_tabular_column(tiny_cohort):
    from xcardia.data.manifest import load_manifest

    manifest = load_manifest(tiny_cohort)
    assert set(DEFAULT_TABULAR_COLUMNS) <= set(manifest.columns)
    # measurement-triggered missingness: an MR jet velocity only where MR of at least mild grade was seen
    has_mr_velocity = manifest["mr_peak_velocity_m_s"].notna()
    assert manifest.loc[has_mr_velocity, "mr_grade"].isin(["mild", "moderate", "severe"]).all()


def test_reported_lvef_is_measured_not_teichholz_of_the_reported_diameters():
    from xcardia.cohort import formulas
    from xcardia.cohort.physiology import sample_patient

    differences = []
    for i in range(200):
        t = sample_patient(0, i).table
        if None not in (t["lvef_percent"], t["lvidd_cm"], t["lvids_cm"]):
            differences.append(t["lvef_percent"] - float(formulas.teichholz_ejection_fraction(t["lvidd_cm"], t["lvids_cm"])))
    assert len(differences) > 150 and np.std(differences) > 3.0  # an independent measurement, not a formula


def _frame(values, sex):
    return pd.DataFrame({"lvef_percent": values, "sex": sex, "mr_grade": ["none", "mild", None, "severe"][: len(values)]})


def test_standardisation_is_fitted_on_the_pretraining_split_only():
    pre = TabularPreprocessor(("lvef_percent", "sex", "mr_grade")).fit(_frame([50.0, 60.0, np.nan, 70.0], ["M", "F", "F", "M"]))
    values, missing = pre.transform(_frame([60.0, np.nan, 80.0, 40.0], ["F", "M", None, "F"]))
    assert values[0, 0] == pytest.approx(0.0) and values[2, 0] == pytest.approx(20 / np.std([50, 60, 70]))
    assert missing[1, 0] and missing[2, 1] and missing[2, 2]
    assert values[0, 2] == pytest.approx((0 - np.mean([0, 2, 4])) / np.std([0, 2, 4]))  # "none" = 0, "mild" = 2


def test_knn_imputation_is_fitted_on_the_pretraining_split_and_fills_everything():
    train = pd.DataFrame({"a_percent": [1.0, 2.0, 3.0, 100.0], "b": [10.0, 20.0, 30.0, 1000.0]})
    pre = TabularPreprocessor(("a_percent", "b"), missing="knn", knn_neighbors=1).fit(train)
    other = pd.DataFrame({"a_percent": [99.0], "b": [np.nan]})
    values, missing = pre.transform(other)
    assert not missing.any()
    restored = values[0, 1] * pre.std[1] + pre.mean[1]
    assert restored == pytest.approx(1000.0)  # its nearest pretraining neighbour, not a test-split statistic
    state = TabularPreprocessor.from_state_dict(pre.state_dict())
    np.testing.assert_allclose(state.transform(other)[0], values)


@pytest.mark.parametrize("encoder", [FeatureTokenTransformer(3, 16, 1, 2, 32, out_dim=8, dropout=0.0), TabularMLP(3, 16, 8)])
def test_tabular_encoders_ignore_values_under_the_missing_mask(encoder):
    encoder.eval()
    x = torch.tensor([[0.5, 1.0, -2.0]])
    missing = torch.tensor([[False, True, False]])
    a = encoder(x, missing)
    b = encoder(torch.tensor([[0.5, 99.0, -2.0]]), missing)
    c = encoder(torch.tensor([[0.5, float("nan"), -2.0]]), missing)
    assert a.shape == (1, 8)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_scarf_replaces_features_with_those_of_other_rows():
    x = torch.arange(12.0).reshape(4, 3)
    missing = torch.zeros(4, 3, dtype=torch.bool)
    same, _ = scarf_corrupt(x, missing, 0.0)
    assert torch.equal(same, x)
    all_swapped, _ = scarf_corrupt(x, missing, 1.0, torch.Generator().manual_seed(0))
    for j in range(3):
        assert set(all_swapped[:, j].tolist()) <= set(x[:, j].tolist())


# ----------------------------------------------------------------------------- weights
def test_encoder_file_round_trip(tmp_path):
    enc = ImageEncoder(SMALL).eval()
    path = save_encoder(tmp_path / "encoder.pt", enc, {"method": "xcardia", "epoch": 3})
    loaded, meta = load_encoder(path)
    loaded.eval()
    x = torch.randn(1, 1, 24, 24, 24)
    torch.testing.assert_close(loaded(x), enc(x))
    assert meta["method"] == "xcardia"
    assert load_encoder(tmp_path)[0].spec == SMALL  # a run folder holding encoder.pt


def test_paper_style_state_dict_loads_through_the_explicit_key_map():
    model = XCardiaModel(ModelSpec(image=SMALL, tabular="mlp"), n_tabular_features=4)
    paper_keys = {k.replace("image_encoder.backbone.", "res3d.").replace("image_encoder.feature.", "fc_img."): v
                  for k, v in model.state_dict().items()}
    target = ImageEncoder(SMALL)
    load_encoder_state(target, paper_keys)
    torch.testing.assert_close(target.feature.weight, model.image_encoder.feature.weight)


def test_partial_weights_are_refused_with_the_keys_listed():
    enc = ImageEncoder(SMALL)
    state = {f"module.wrong_prefix.{k}": v for k, v in enc.state_dict().items()}  # the public code's situation
    with pytest.raises(XcardiaError, match=r"encoder tensor\(s\) missing \(e\.g\. backbone"):
        load_encoder_state(ImageEncoder(SMALL), state)
    other = ImageEncoder(ImageEncoderSpec(arch="resnet18", widths=(8, 16, 16, 32), conv1_size=3, max_pool=False))
    with pytest.raises(XcardiaError, match="missing"):
        load_encoder_state(other, enc.state_dict())


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nothing.pt", "does not exist"),
    (lambda p: (p / "notes.pt").write_text("hello") and p / "notes.pt", "not a readable weights file"),
    (lambda p: torch.save({"weights": torch.zeros(2)}, p / "other.pt") or p / "other.pt", "not an xcardia encoder"),
])
def test_bad_init_paths_are_refused(tmp_path, make, message):
    with pytest.raises(XcardiaError, match=message):
        load_encoder(make(tmp_path))
