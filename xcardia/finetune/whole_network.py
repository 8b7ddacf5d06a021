"""The public network run whole — every volume through every stage at every step, in training mode as
``model_engine.train()`` leaves it (``Finetuning.py:556``):

- :func:`train_scratch_all`, the public no-pretraining baseline (``Finetuning.py:334-346``): every layer of a randomly
  initialised network trained — the costliest protocol, so it runs once per setting (register D10);
- :func:`train_frozen_trunk_network`, the exact public semantic of fine-tuning a pretrained init: the stem and
  layer1–3 frozen but their BatchNorm normalising each micro-batch with its own statistics and moving its running
  statistics, layer4 and the re-initialised feature layer trained. The ``paper`` protocol trains on a cached trunk
  instead (thousands of runs on a CPU); this is the reference its treatment of the trunk's BatchNorm is measured
  against (``bench/trunk_batchnorm.py``, register D3).
"""

from __future__ import annotations

import copy
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


class FrozenTrunkNetwork(nn.Module):
    """The public ``MultiTaskModel`` of a pretrained init (``Finetuning.py:295-346``): the encoder with its feature
    layer re-initialised (when ``reinit_feature``), ten heads, only layer4 and the feature layer trainable. Built in
    the order :class:`~xcardia.finetune.protocol.TopModel` draws its random numbers, so the same seed gives the same
    initial feature layer and heads."""

    def __init__(self, encoder: ImageEncoder, n_tasks: int, reinit_feature: bool = True):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        if reinit_feature:
            self.encoder.feature = nn.Linear(encoder.feature.in_features, encoder.feature.out_features)
        self.heads = nn.Linear(encoder.spec.feature_dim, n_tasks)
        for name, p in self.encoder.named_parameters():
            p.requires_grad = name.startswith(("backbone.layer4.", "feature."))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.heads(self.encoder(x))


def train_frozen_trunk_network(encoder: ImageEncoder, dataset_train: CohortDataset, dataset_val: CohortDataset | None,
                               dataset_test: CohortDataset, labels: np.ndarray, spec: FinetuneSpec, seed: int,
                               epochs: int | None = None) -> np.ndarray:
    """The public fine-tuning of a pretrained ``encoder`` run exactly as the public loop runs it: the whole network in
    training mode each epoch (the frozen stages' BatchNorm on micro-batch statistics, their running statistics
    moving), early stopping on ``dataset_val`` — or, without it, ``epochs`` fixed epochs under the k-shot schedule
    ``spec.kshot_schedule``. ``labels`` holds the training rows' labels (indexed by manifest row). Returns the test
    probabilities (n_test, T)."""
    torch.manual_seed(seed)
    net = FrozenTrunkNetwork(encoder, labels.shape[1], spec.reinit_feature)
    y_train = torch.as_tensor(labels[dataset_train.rows])
    images = torch.stack([dataset_train[i]["image"] for i in range(len(dataset_train))])

    @torch.no_grad()
    def predict(ds):
        net.eval()
        out = [torch.sigmoid(net(b["image"])) for b in torch.utils.data.DataLoader(ds, batch_size=128)]
        return torch.cat(out).numpy()

    validate = None if dataset_val is None else (lambda: macro_auroc(labels[dataset_val.rows], predict(dataset_val)))
    span = dataset_val is None and epochs is not None and spec.kshot_schedule == "span"
    train_public_protocol(net, net.parameters(), lambda take: net(images[take]), y_train, spec, seed, validate, epochs,
                          span_schedule=span)
    return predict(dataset_test)
