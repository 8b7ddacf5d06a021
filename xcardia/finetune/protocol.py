"""The public fine-tuning protocol (``Finetune/Finetuning.py``): the trainable top of the encoder, the loop with its
optimiser, schedule, accumulation and clipping, and the validation macro AUROC it stops on.

Every hyper-parameter is pinned to its public line by ``tests/test_protocol_pinning.py``; the differences that
remain are rows D1–D12 of ``docs/method.md`` §6.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch
from torch import nn

from xcardia.finetune.early_stopping import EarlyStopping
from xcardia.finetune.encoding import EncodedInit
from xcardia.losses import masked_bce_with_logits, pos_weight_from_subset, public_optimizer
from xcardia.metrics import auroc
from xcardia.models.image_encoder import ImageEncoder
from xcardia.specs import FinetuneSpec


class TopModel(nn.Module):
    """What the paper's fine-tuning trains: a copy of the last ResNet stage, the feature layer after it
    (re-initialised when ``reinit_feature``, as ``Finetuning.py:336-338``), and the task heads."""

    def __init__(self, encoder: ImageEncoder, n_tasks: int, reinit_feature: bool = True,
                 train_batchnorm: bool = True):
        super().__init__()
        self.layer4 = copy.deepcopy(encoder.backbone.layer4)
        self.pool = copy.deepcopy(encoder.backbone.avgpool)
        self.feature = (nn.Linear(encoder.feature.in_features, encoder.feature.out_features) if reinit_feature
                        else copy.deepcopy(encoder.feature))
        self.heads = nn.Linear(encoder.spec.feature_dim, n_tasks)
        self.train_batchnorm = train_batchnorm

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return self.heads(self.feature(self.pool(self.layer4(trunk)).flatten(1)))

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_batchnorm:
            for m in self.modules():  # frozen BatchNorm statistics
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self


def macro_auroc(y: np.ndarray, p: np.ndarray) -> float:
    values = [auroc(y[:, t], p[:, t]) for t in range(y.shape[1])]
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


@torch.no_grad()
def predict_top(model: TopModel, trunk: torch.Tensor, batch: int = 256) -> np.ndarray:
    model.eval()
    return torch.cat([torch.sigmoid(model(trunk[i:i + batch])) for i in range(0, len(trunk), batch)]).numpy()


def train_public_protocol(model: nn.Module, parameters, forward, y: torch.Tensor, spec: FinetuneSpec, seed: int,
                          validate=None, epochs: int | None = None, span_schedule: bool = False) -> EarlyStopping:
    """The public fine-tuning loop (``Finetuning.py:422-616``) over ``len(y)`` training rows.

    ``forward(rows)`` returns the logits (B, T) of those training rows; ``validate()`` the validation macro AUROC
    (None: no early stopping, ``epochs`` fixed epochs). Micro-batches of ``spec.batch_size`` in a fresh random order
    each epoch; the loss is the masked BCE (sum over labelled entries / their count, a micro-batch without labels is
    skipped, :462-476, :565-566) with ``pos_weight`` from these rows (defect 7 fixed); gradients are accumulated over
    ``grad_accum_steps`` micro-batches counted across epochs (DeepSpeed's global micro-step), clipped to norm
    ``grad_clip``, then AdamW steps; OneCycleLR (cosine, ``max(lr, 1e-3)`` peak) is stepped every micro-batch over
    ``max_epochs`` epochs' worth of micro-batches (``span_schedule``: over exactly ``epochs``, the k-shot stand-in's
    schedule, register D9). The best epoch's weights are loaded back into ``model``.

    Returns:
        The stopper (``best_epoch``, ``epochs``, ``best``) for the record.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in parameters if p.requires_grad]
    pos_weight = pos_weight_from_subset(y, spec.pos_weight_cap)
    optimizer, scheduler = public_optimizer(parameters, spec, len(y), epochs, span=span_schedule)
    stopper = EarlyStopping(spec.patience, spec.min_delta, spec.min_epochs)
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    for _epoch in range(epochs or spec.max_epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(order), spec.batch_size):
            take = order[i:i + spec.batch_size]
            target = y[take]
            if not (~torch.isnan(target)).any():
                continue
            loss = masked_bce_with_logits(forward(take), target, pos_weight)
            (loss / spec.grad_accum_steps).backward()
            micro += 1
            if micro % spec.grad_accum_steps == 0:
                torch.nn.utils.clip_grad_norm_(parameters, spec.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if scheduler.last_epoch + 1 < scheduler.total_steps:
                with warnings.catch_warnings():  # stepped per micro-batch, before the first accumulated step, as :569
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
        if validate is None:
            continue
        if stopper.step(validate(), model.state_dict):
            break
    if stopper.best_state is not None:
        model.load_state_dict(stopper.best_state)
    return stopper


def train_top(init: EncodedInit, labels: np.ndarray, train_rows: np.ndarray, val_rows: np.ndarray | None,
              spec: FinetuneSpec, seed: int, epochs: int | None = None) -> TopModel:
    """The paper's protocol on ``train_rows`` (:func:`train_public_protocol` on the cached frozen trunk): early
    stopping on validation macro AUROC when ``val_rows`` is given, else ``epochs`` fixed epochs under the k-shot
    schedule ``spec.kshot_schedule``."""
    torch.manual_seed(seed)
    model = TopModel(init.encoder, labels.shape[1], spec.reinit_feature, spec.train_batchnorm)
    trunk = init.trunk[torch.as_tensor(init.at(train_rows))]
    y = torch.as_tensor(labels[train_rows])
    validate = None
    if val_rows is not None:
        val_trunk = init.trunk[torch.as_tensor(init.at(val_rows))]
        validate = lambda: macro_auroc(labels[val_rows], predict_top(model, val_trunk))  # noqa: E731
    span = val_rows is None and epochs is not None and spec.kshot_schedule == "span"
    train_public_protocol(model, model.parameters(), lambda take: model(trunk[take]), y, spec, seed, validate, epochs,
                          span_schedule=span)
    return model
