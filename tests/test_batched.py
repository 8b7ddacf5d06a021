"""Batched k-shot training (issue 23.3): M members trained as one grouped network give the predictions of training
each alone with ``finetune.train_top`` (same seeds, same subsets). In float64 the two agree to ~1e-7 (the algorithm
is the same; Adam's division by √v amplifies rounding in near-zero gradients), in float32 to ~3e-4."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xcardia import finetune
from xcardia.batched import GroupedTopModel, predict_grouped, train_kshot_grouped
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec


def _encoded(dtype):
    torch.manual_seed(0)
    encoder = ImageEncoder(ImageEncoderSpec(arch="resnet18", widths=(8, 8, 16, 16), conv1_size=3, max_pool=False))
    encoder = encoder.to(dtype)
    volumes = torch.randn(60, 1, 24, 24, 24, dtype=dtype)
    with torch.no_grad():
        encoder.eval()
        trunk = encoder.trunk(volumes)
    init = finetune.EncodedInit("x", encoder, np.arange(60), trunk, np.zeros((60, 128)), {i: i for i in range(60)})
    labels = (np.random.default_rng(0).random((60, 3)) < 0.4).astype(float)
    return init, labels


@pytest.mark.parametrize("dtype, k, epochs, atol", [
    (torch.float64, 5, 7, 1e-6),    # one micro-batch per epoch
    (torch.float64, 10, 4, 1e-6),   # two micro-batches per epoch (20 rows / 12), accumulation across them
    (torch.float32, 5, 7, 2e-3),
])
def test_grouped_members_predict_as_each_trained_alone(dtype, k, epochs, atol):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        init, labels = _encoded(dtype)
        spec = finetune.FinetuneSpec()
        jobs = [(t, d, finetune.kshot_subset(labels, np.arange(40), t, k, d)[0]) for t in range(3) for d in range(2)]
        test = torch.as_tensor(np.arange(40, 60))
        alone = [finetune.predict_top(finetune.train_top(init, labels[:, [t]], rows, None, spec, d, epochs=epochs),
                                       init.trunk[test])[:, 0] for t, d, rows in jobs]
        members = []
        for _t, d, _rows in jobs:  # built exactly as train_top builds them
            torch.manual_seed(d)
            members.append(finetune.TopModel(init.encoder, 1, spec.reinit_feature, spec.train_batchnorm))
        grouped = train_kshot_grouped(members, init.trunk, [r for *_, r in jobs],
                                      [labels[r][:, [t]] for t, _, r in jobs], [d for _, d, _ in jobs], spec, epochs)
        together = predict_grouped(grouped, init.trunk[test])[:, :, 0]
        np.testing.assert_allclose(together.T, np.stack(alone), atol=atol)
        one = grouped.member(2, finetune.TopModel(init.encoder, 1))  # a member taken out is the same model
        np.testing.assert_allclose(finetune.predict_top(one, init.trunk[test])[:, 0], alone[2], atol=atol)
    finally:
        torch.set_default_dtype(default)


def test_grouping_refuses_layers_it_cannot_keep_separate():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer4 = torch.nn.Sequential(torch.nn.Linear(3, 3))

    with pytest.raises(TypeError, match="cannot group a Linear"):
        GroupedTopModel([Odd(), Odd()])
