"""The public no-pretraining baseline (``Finetuning.py:334-346``): every layer of a randomly initialised network
trained with the public loop — the costliest protocol, so it runs once per setting (register D10)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from torch import nn

from xcardia.data.dataset import CohortDataset
from xcardia.finetune.protocol import macro_auroc, train_public_protocol
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec
from xcardia.specs import FinetuneSpec


class _ScratchNetwork(nn.Module):
    """The public scratch model: a randomly initialised encoder and the ten heads, every layer trained."""

    def __init__(self, image_spec: ImageEncoderSpec, n_tasks: int):
        super().__init__()
        self.encoder = ImageEncoder(image_spec)
        self.heads = nn.Linear(image_spec.feature_dim, n_tasks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(x))


def _stack_images(dataset: CohortDataset, positions) -> torch.Tensor:
    return torch.stack([dataset[int(i)]["image"] for i in positions])


def train_scratch_all(manifest, dataset_train: CohortDataset, dataset_val: CohortDataset, dataset_test: CohortDataset,
                      image_spec: ImageEncoderSpec, labels: np.ndarray, spec: FinetuneSpec, seed: int) -> np.ndarray:
    """The public scratch baseline (``Finetuning.py:334-346``): every layer from random weights, trained with the
    public loop (:func:`train_public_protocol`, ≤ ``scratch_all_max_epochs``). Returns test probabilities (n_test, T)."""
    torch.manual_seed(seed)
    net = _ScratchNetwork(image_spec, labels.shape[1])
    y_train = torch.as_tensor(labels[dataset_train.rows])

    @torch.no_grad()
    def predict(ds):
        net.eval()
        out = [torch.sigmoid(net(b["image"])) for b in torch.utils.data.DataLoader(ds, batch_size=128)]
        return torch.cat(out).numpy()

    train_public_protocol(net, net.parameters(), lambda take: net(_stack_images(dataset_train, take)), y_train,
                          replace(spec, max_epochs=spec.scratch_all_max_epochs), seed,
                          lambda: macro_auroc(labels[dataset_val.rows], predict(dataset_val)))
    return predict(dataset_test)
