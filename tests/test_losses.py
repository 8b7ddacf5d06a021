"""Losses and the NW head against slow, obvious loop-based references (float64)."""

from __future__ import annotations

import math

import pytest
import torch

from xcardia.losses import (
    LearnableTemperature,
    clip_loss,
    masked_bce,
    masked_bce_with_logits,
    masked_mse,
    nw_predict,
    pos_weight_from_subset,
)



@pytest.fixture(autouse=True)
def float64():
    """References are compared in float64; the default is restored for the rest of the suite."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def reference_clip(img, tab, tau):
    """Symmetric InfoNCE written out one row at a time."""
    n = img.shape[0]
    img = [img[i] / img[i].norm() for i in range(n)]
    tab = [tab[i] / tab[i].norm() for i in range(n)]
    total = 0.0
    for i in range(n):
        row = torch.stack([img[i] @ tab[j] / tau for j in range(n)])
        col = torch.stack([tab[i] @ img[j] / tau for j in range(n)])
        total = total - torch.log_softmax(row, 0)[i] - torch.log_softmax(col, 0)[i]
    return total / (2 * n)


def reference_nw(query, support, targets, mask, tau, kernel, exclude=None):
    b, s = query.shape[0], support.shape[0]
    pred = torch.full((b, targets.shape[1]), float("nan"))
    weights = torch.zeros(b, s)
    for i in range(b):
        sims = []
        for j in range(s):
            if kernel == "cosine":
                sim = query[i] @ support[j] / (query[i].norm() * support[j].norm())
            else:
                sim = -((query[i] - support[j]) ** 2).sum()
            sims.append(float("-inf") if exclude is not None and exclude[i, j] else sim / tau)
        w = torch.softmax(torch.stack([torch.as_tensor(x) for x in sims]), 0)
        weights[i] = w
        for c in range(targets.shape[1]):
            den = sum(w[j] * mask[j, c] for j in range(s))
            if den > 0:
                pred[i, c] = sum(w[j] * mask[j, c] * targets[j, c] for j in range(s)) / den
    return pred, weights


@pytest.mark.parametrize("tau", [0.07, 0.5, 1.0])
def test_clip_loss_matches_reference_value_and_gradients(tau):
    g = torch.Generator().manual_seed(0)
    img = torch.randn(7, 5, generator=g, requires_grad=True)
    tab = torch.randn(7, 5, generator=g, requires_grad=True)
    ours = clip_loss(img, tab, tau)
    ref_img, ref_tab = img.detach().clone().requires_grad_(), tab.detach().clone().requires_grad_()
    ref = reference_clip(ref_img, ref_tab, tau)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-10)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(img.grad, ref_img.grad, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(tab.grad, ref_tab.grad, atol=1e-9, rtol=1e-7)


def test_clip_loss_is_minimal_for_aligned_pairs():
    x = torch.eye(6)
    aligned = clip_loss(x, x, 0.07).item()
    shuffled = clip_loss(x, x[torch.tensor([1, 0, 3, 2, 5, 4])], 0.07).item()
    assert aligned < 0.01 < shuffled


def test_learnable_temperature_is_clamped_at_one_over_100():
    t = LearnableTemperature(0.07, learnable=True)
    assert t().item() == pytest.approx(0.07)
    with torch.no_grad():
        t.logit_scale.fill_(10.0)
    assert t().item() == pytest.approx(0.01)
    fixed = LearnableTemperature(1.0, learnable=False)
    assert not list(fixed.parameters())


def _bank(seed=0, b=4, s=9, c=3, d=6):
    g = torch.Generator().manual_seed(seed)
    query, support = torch.randn(b, d, generator=g), torch.randn(s, d, generator=g)
    targets = (torch.rand(s, c, generator=g) > 0.5).double()
    mask = (torch.rand(s, c, generator=g) > 0.3).double()
    mask[:, 2] = 0.0  # a whole target column missing
    return query, support, targets, mask


@pytest.mark.parametrize("kernel", ["cosine", "euclidean"])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_nw_predict_matches_reference(kernel, tau):
    query, support, targets, mask = _bank()
    pred, weights = nw_predict(query, support, targets, tau, kernel=kernel, support_mask=mask)
    ref_pred, ref_weights = reference_nw(query, support, targets, mask, tau, kernel)
    torch.testing.assert_close(weights, ref_weights, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(pred, ref_pred, atol=1e-9, rtol=1e-7, equal_nan=True)
    assert torch.isnan(pred[:, 2]).all()  # no observed support target: no prediction, never 0 or 1


def test_nw_chunking_gives_identical_results():
    query, support, targets, mask = _bank(s=25)
    whole = nw_predict(query, support, targets, 0.2, support_mask=mask)
    chunked = nw_predict(query, support, targets, 0.2, support_mask=mask, chunk_size=4)
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_nw_prediction_is_a_convex_combination_of_observed_support_targets():
    g = torch.Generator().manual_seed(3)
    query, support = torch.randn(20, 4, generator=g), torch.randn(30, 4, generator=g)
    targets = torch.randn(30, 2, generator=g)
    pred, weights = nw_predict(query, support, targets, 0.3)
    assert torch.allclose(weights.sum(1), torch.ones(20)) and (weights >= 0).all()
    assert (pred >= targets.min(0).values - 1e-12).all() and (pred <= targets.max(0).values + 1e-12).all()


def test_nw_small_temperature_returns_the_nearest_supports_targets():
    query, support, targets, _ = _bank(s=12)
    pred, _ = nw_predict(query, support, targets, 1e-4)
    nearest = (torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(support, dim=1).t()).argmax(1)
    torch.testing.assert_close(pred, targets[nearest], atol=1e-6, rtol=0)


def test_nw_permuting_the_support_changes_nothing():
    query, support, targets, mask = _bank(s=15)
    perm = torch.randperm(15, generator=torch.Generator().manual_seed(1))
    a, wa = nw_predict(query, support, targets, 0.5, support_mask=mask)
    b, wb = nw_predict(query, support[perm], targets[perm], 0.5, support_mask=mask[perm])
    torch.testing.assert_close(a, b, equal_nan=True)
    torch.testing.assert_close(wa[:, perm], wb)


def test_nw_missing_target_never_counts_as_zero_or_one():
    query, support, targets, mask = _bank()
    results = []
    for fill in (0.0, 1.0, float("nan")):
        t = torch.where(mask.bool(), targets, torch.full_like(targets, fill))
        results.append(nw_predict(query, support, t, 0.5, support_mask=mask)[0])
    torch.testing.assert_close(results[0], results[1], equal_nan=True)
    torch.testing.assert_close(results[0], results[2], equal_nan=True)
    nan_targets = torch.where(mask.bool(), targets, torch.full_like(targets, float("nan")))
    torch.testing.assert_close(nw_predict(query, support, nan_targets, 0.5)[0], results[0], equal_nan=True)


def test_nw_exclude_leaves_each_query_out_of_its_own_support():
    query, _, targets, mask = _bank(b=6, s=6)
    exclude = torch.eye(6, dtype=torch.bool)
    pred, weights = nw_predict(query, query, targets, 0.5, support_mask=mask, exclude=exclude)
    assert (weights.diagonal() == 0).all()
    ref_pred, _ = reference_nw(query, query, targets, mask, 0.5, "cosine", exclude)
    torch.testing.assert_close(pred, ref_pred, equal_nan=True)


def test_nw_near_uniform_weights_at_the_papers_temperature():
    """Defect 5: cosine similarity lies in [-1, 1], so τ = 1 cannot make weights peaked."""
    query, support, targets, _ = _bank(s=20)
    _, w1 = nw_predict(query, support, targets, 1.0)
    _, w01 = nw_predict(query, support, targets, 0.05)
    assert w1.max() < math.e**2 / 20  # at most e² times uniform
    assert w01.max() > 3 * w1.max()


def reference_masked_bce(p, y, eps=1e-6):
    total, n = 0.0, 0
    for i in range(p.shape[0]):
        for c in range(p.shape[1]):
            if math.isnan(y[i, c]) or math.isnan(p[i, c]):
                continue
            q = min(max(p[i, c].item(), eps), 1 - eps)
            total += -(y[i, c].item() * math.log(q) + (1 - y[i, c].item()) * math.log(1 - q))
            n += 1
    return total / max(n, 1)


def test_masked_bce_matches_reference_and_ignores_missing():
    g = torch.Generator().manual_seed(5)
    p = torch.rand(8, 4, generator=g)
    y = (torch.rand(8, 4, generator=g) > 0.5).double()
    y[torch.rand(8, 4, generator=g) > 0.6] = float("nan")
    y[:, 3] = float("nan")  # a whole column missing
    p[0, 0] = float("nan")  # no NW prediction for this entry
    assert masked_bce(p, y).item() == pytest.approx(reference_masked_bce(p, y), abs=1e-10)


def test_masked_losses_with_nothing_observed_are_zero_and_differentiable():
    p = torch.rand(3, 2, requires_grad=True)
    y = torch.full((3, 2), float("nan"))
    loss = masked_bce(p, y) + masked_mse(p, y) + masked_bce_with_logits(p, y)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(p.grad).all()


def test_masked_mse_matches_reference():
    pred = torch.tensor([[1.0, 2.0], [3.0, float("nan")]])
    y = torch.tensor([[0.0, float("nan")], [1.0, 5.0]])
    assert masked_mse(pred, y).item() == pytest.approx((1.0 + 4.0) / 2)


def test_masked_bce_with_logits_and_pos_weight_match_reference():
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.2, 0.1]])
    y = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0]])
    w = torch.tensor([2.0, 0.5])
    total, n = 0.0, 0
    for i in range(3):
        for c in range(2):
            if math.isnan(y[i, c]):
                continue
            s = 1 / (1 + math.exp(-logits[i, c].item()))
            total += -(w[c].item() * y[i, c].item() * math.log(s) + (1 - y[i, c].item()) * math.log(1 - s))
            n += 1
    assert masked_bce_with_logits(logits, y, w).item() == pytest.approx(total / n)


def test_pos_weight_comes_from_the_subset_given():
    y = torch.tensor([[1.0, 0.0, float("nan")], [0.0, 0.0, 1.0], [0.0, float("nan"), 1.0], [0.0, 0.0, 1.0]])
    torch.testing.assert_close(pos_weight_from_subset(y), torch.tensor([3.0, 1.0, 1.0]))


def test_nw_concept_without_observed_support_gives_finite_gradients():
    """Issue 11.6: a concept no support entry observes (possible with queue and batch banks) used to form 0/0 before
    the mask, which sent NaN gradients into the encoders."""
    torch.manual_seed(0)
    query = torch.randn(4, 8, requires_grad=True)
    support = torch.randn(6, 8, requires_grad=True)
    targets = torch.tensor([[1.0, float("nan")]] * 3 + [[0.0, float("nan")]] * 3)  # concept 1 never observed
    prediction, _ = nw_predict(query, support, targets, 0.5)
    assert torch.isnan(prediction[:, 1]).all()
    masked_bce(prediction, torch.tensor([[1.0, 1.0]] * 4)).backward()
    assert torch.isfinite(query.grad).all() and torch.isfinite(support.grad).all()
    assert query.grad.abs().sum() > 0


@pytest.mark.parametrize("clip_weight, nw_weight", [(1.0, 0.5), (1.0, 0.0), (0.0, 0.5)])
def test_pretraining_loss_is_the_papers_equation(clip_weight, nw_weight):
    """eq. (1) of docs/method.md: w_clip · L_clip + λ_nw · masked BCE of the NW prediction over the step's bank."""
    from xcardia.losses import nw_query, pretraining_loss

    torch.manual_seed(3)
    e_img, e_tab = torch.randn(6, 8), torch.randn(6, 8)
    concepts = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0], [0.0, 0.0], [float("nan"), 1.0], [1.0, 0.0]])
    bank, bank_targets = torch.nn.functional.normalize(torch.randn(5, 8), dim=1), torch.tensor([[1.0, 0.0]] * 5)
    tau_clip, tau_nw = torch.tensor(0.07), torch.tensor(0.5)
    loss, parts = pretraining_loss(e_img, e_tab, concepts, tau_clip, tau_nw, clip_weight, nw_weight, "fused",
                                   lambda q, c: (bank, bank_targets, None))
    expected = torch.zeros(())
    if clip_weight:
        expected = expected + clip_weight * clip_loss(e_img, e_tab, tau_clip)
    if nw_weight:
        prediction, _ = nw_predict(nw_query(e_img, e_tab, "fused"), bank, bank_targets, tau_nw)
        expected = expected + nw_weight * masked_bce(prediction, concepts)
    torch.testing.assert_close(loss, expected)
    assert ("nw" in parts) == bool(nw_weight) and ("clip" in parts) == bool(clip_weight)
