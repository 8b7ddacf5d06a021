"""Interpretability measures on planted signals and hand-made maps."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from xcardia.interpret import (
    axis_cosines,
    effective_supports,
    embedding_2d,
    heart_regions,
    heart_share,
    heart_share_table,
    nw_temperature_sweep,
    phenotype_axes,
    reliability_curve,
    traversal_positions,
)


def test_ridge_axis_recovers_a_planted_linear_phenotype_and_nothing_from_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 32))
    w = rng.normal(size=32)
    signal = x @ w
    table = pd.DataFrame({"planted": signal + rng.normal(0, 0.1 * signal.std(), 400),
                          "noise": rng.normal(size=400)})
    table.loc[::10, "planted"] = np.nan  # missing values are left out, not imputed
    r2, directions, predictions = phenotype_axes(x, table, phenotypes=("planted", "noise"), seed=0)
    r2 = r2.set_index("phenotype")["r2"]
    assert r2["planted"] > 0.95
    assert abs(r2["noise"]) < 0.05
    assert abs(np.dot(directions["planted"], w / np.linalg.norm(w))) > 0.9
    assert np.isnan(predictions["planted"][::10]).all()


def test_axis_cosines_are_one_on_the_diagonal():
    d = {"a": np.array([1.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([1.0, 1.0]) / math.sqrt(2)}
    c = axis_cosines(d)
    assert c.loc["a", "a"] == 1 and c.loc["a", "b"] == 0 and c.loc["a", "c"] == pytest.approx(1 / math.sqrt(2))


def test_heart_share_on_hand_made_maps():
    heart = np.zeros((4, 4, 4), dtype=bool)
    heart[1:3, 1:3, 1:3] = True  # 8 voxels
    inside = np.where(heart, 1.0, 0.0)
    assert heart_share(inside, heart) == 1.0
    uniform = np.ones((4, 4, 4))
    assert heart_share(uniform, heart) == pytest.approx(8 / 64)
    half = np.where(heart, 1.0, 0.0)
    half[0, 0, 0] = 8.0  # as much mass outside as inside
    assert heart_share(half, heart) == pytest.approx(0.5)
    assert heart_share(-uniform, heart) != heart_share(-uniform, heart)  # no positive mass: NaN
    assert heart_share(np.where(heart, 1.0, -5.0), heart) == 1.0  # negative saliency does not count


def test_heart_share_table_uses_the_label_map_and_reports_the_uniform_reference():
    labelmaps = np.zeros((3, 6, 6, 6), dtype=np.uint8)
    labelmaps[:, 2:4, 2:4, 2:4] = 8  # LV myocardium
    maps = {"inside": (labelmaps == 8).astype(float), "uniform": np.ones(labelmaps.shape)}
    table = heart_share_table(maps, labelmaps, n_boot=50).set_index(["method", "region"])
    assert table.loc[("inside", "heart"), "saliency_share"] == 1.0
    assert table.loc[("uniform", "heart"), "saliency_share"] == pytest.approx(8 / 216)
    assert table.loc[("uniform", "heart"), "volume_share"] == pytest.approx(8 / 216)
    assert heart_regions(labelmaps)["heart and border"].sum() > heart_regions(labelmaps)["heart"].sum()


def test_effective_supports_is_the_bank_size_for_uniform_and_one_for_one_hot():
    uniform = torch.full((2, 20), 1 / 20)
    one_hot = torch.zeros(1, 20)
    one_hot[0, 3] = 1.0
    assert effective_supports(uniform) == pytest.approx([20, 20])
    assert effective_supports(one_hot) == pytest.approx([1.0])


def test_temperature_sweep_gives_near_uniform_weights_at_tau_one():
    rng = np.random.default_rng(1)
    bank, targets = rng.normal(size=(20, 8)), (rng.random((20, 4)) < 0.5).astype(float)
    q = {"test": rng.normal(size=(50, 8))}
    y = {"test": (rng.random((50, 4)) < 0.5).astype(float)}
    sweep = nw_temperature_sweep(bank, targets, q, y, [0.01, 1.0]).set_index("tau")
    assert sweep.loc[1.0, "effective_supports"] > 17  # cosine ∈ [−1, 1]: τ = 1 cannot sharpen the weights
    assert sweep.loc[0.01, "effective_supports"] < 3


def test_reliability_curve_bins():
    curve = reliability_curve(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.95]))
    assert list(curve["bin"]) == [1, 9] and list(curve["frequency"]) == [0.5, 1.0]


def test_2d_maps_are_seeded():
    x = np.random.default_rng(2).normal(size=(60, 10))
    np.testing.assert_array_equal(embedding_2d(x, "tsne", 0), embedding_2d(x, "tsne", 0))
    assert embedding_2d(x, "pca").shape == (60, 2)


def test_traversal_positions_span_the_axis():
    values = np.r_[np.linspace(0, 1, 101), np.nan]
    picks = traversal_positions(values, n=3)
    assert list(values[picks]) == pytest.approx([0.05, 0.5, 0.95])


def test_saliency_inside_the_heart_works_from_a_heart_mask_column(tiny_cohort, tmp_path):
    """Issue 13: a real cohort has no label maps; TotalSegmentator-style heart masks in the CT's space give the same
    heart region on the preprocessed voxels as the synthetic label maps do."""
    import shutil

    import nibabel as nib
    import pandas as pd

    from xcardia.cohort.render import HEART_LABELS
    from xcardia.config import get_profile
    from xcardia.data.manifest import load_manifest
    from xcardia.interpret import heart_label_volumes, saliency_study

    cohort = tmp_path / "real"
    shutil.copytree(tiny_cohort, cohort)
    df = pd.read_csv(cohort / "manifest.csv", dtype=str, keep_default_na=False)
    (cohort / "seg").mkdir()
    for i, row in df.iterrows():
        labels = nib.load(str(cohort / row["labelmap_path"]))
        heart = np.isin(np.asarray(labels.dataobj), HEART_LABELS).astype(np.uint8)
        nib.save(nib.Nifti1Image(heart, labels.affine), str(cohort / "seg" / f"{row['patient_id']}_heart.nii.gz"))
        df.loc[i, "heart_mask_path"] = f"seg/{row['patient_id']}_heart.nii.gz"
    df.drop(columns=["labelmap_path"]).to_csv(cohort / "manifest.csv", index=False)
    (cohort / "cohort.json").unlink()  # now a "real" cohort: no generator record, no label maps
    shutil.rmtree(cohort / "labelmap")

    profile = get_profile("smoke")
    manifest = load_manifest(cohort)
    rows = np.flatnonzero((manifest["split"] == "test").to_numpy())[:3]
    from_masks = heart_label_volumes(manifest, rows, profile.preprocess)
    assert from_masks.shape == (3, *profile.preprocess.shape) and (from_masks > 0).any()
    study = saliency_study(profile, manifest, {"scratch": "scratch"}, tmp_path / "cache", n_patients=3, n_boot=10)
    heart = study["table"][study["table"]["region"] == "heart"]
    assert len(heart) == 2 and heart["volume_share"].between(0.01, 0.9).all()
    # the example CT comes back in HU (the network saw the HU window mapped to [−1, 1]): a mediastinal window shows
    # air, soft tissue and the heart in different greys, not one flat grey
    volume = study["volume"]
    lo, hi = profile.preprocess.hu_window
    assert volume.min() == pytest.approx(lo, abs=1.0) and volume.max() > 100
    assert np.median(volume[study["heart"]]) > 0 > np.percentile(volume, 5)


def test_cross_modal_pca_reads_alignment_as_matched_over_unmatched_cosine_and_a_gap_between_clouds():
    from xcardia.interpret import cross_modal_pca

    rng = np.random.default_rng(0)
    z = rng.normal(size=(60, 16))
    aligned = cross_modal_pca(z, z + 0.1 * rng.normal(size=z.shape))
    assert aligned["matched_cosine"] > 0.9 > 0.2 > abs(aligned["unmatched_cosine"])
    assert aligned["modality_gap"] < 0.2 and aligned["coords"].shape == (120, 2)
    apart = cross_modal_pca(z + 5.0, rng.normal(size=z.shape) - 5.0)  # two clouds, unrelated patients
    assert apart["modality_gap"] > 3 and abs(apart["matched_cosine"] - apart["unmatched_cosine"]) < 0.1
