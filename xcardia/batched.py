"""Many small downstream models trained as one program (issue 23.3).

True k-shot evaluation trains thousands of :class:`~xcardia.finetune.TopModel` copies — one per task × draw × init
— that share their shapes and, at a given k, their number of training rows (2k). Instead of a Python loop over them,
:class:`GroupedTopModel` packs M of them into one network whose every layer is the M layers side by side along the
channel axis: convolutions become grouped convolutions (``groups = M``), BatchNorm over M·C channels keeps each
member's statistics separate (a channel sees only its member's samples), the feature layer and heads become batched
matrix products. Member m's micro-batch sits in channel block m, so one forward/backward step trains all M members
on their own data; AdamW is element-wise, gradient clipping is done per member, and the OneCycle schedule is the
same for all (same rows, same epochs). :func:`train_kshot_grouped` is :func:`xcardia.finetune.train_top` for M
members at once and gives the same predictions to float tolerance (``tests/test_batched.py``).

Works for any layer stack made of 3-D convolutions, BatchNorm, element-wise activations and adaptive average
pooling (MONAI's ResNet stages), which is what the last ResNet stage is.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import torch
from torch import nn

from xcardia.losses import pos_weight_from_subset, public_optimizer
from xcardia.specs import FinetuneSpec


def _grouped(module: nn.Module, members: list[nn.Module]) -> nn.Module:
    """A copy of ``module`` whose convolutions and BatchNorms hold the corresponding layers of every member."""
    if isinstance(module, nn.Conv3d):
        m = len(members)
        conv = nn.Conv3d(module.in_channels * m, module.out_channels * m, module.kernel_size, module.stride,
                         module.padding, module.dilation, groups=module.groups * m, bias=module.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(torch.cat([x.weight for x in members]))
            if module.bias is not None:
                conv.bias.copy_(torch.cat([x.bias for x in members]))
        return conv
    if isinstance(module, nn.BatchNorm3d):
        bn = nn.BatchNorm3d(module.num_features * len(members), module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, name).copy_(torch.cat([getattr(x, name) for x in members]))
            bn.num_batches_tracked.copy_(members[0].num_batches_tracked)
        return bn
    if any(isinstance(module, t) for t in (nn.Linear, nn.modules.batchnorm._BatchNorm, nn.modules.conv._ConvNd)):
        raise TypeError(f"cannot group a {type(module).__name__}: only Conv3d, BatchNorm3d and channel-wise layers")
    out = copy.copy(module)
    out._modules = {name: (_grouped(child, [getattr(x, name) for x in members]) if child is not None else None)
                    for name, child in module._modules.items()}
    return out


def _ungrouped(grouped: nn.Module, template: nn.Module, m: int, n: int) -> None:
    """Write member ``m`` (of ``n``) of ``grouped`` back into ``template`` (same structure as one member)."""
    for (name, g), (_, t) in zip(grouped.named_modules(), template.named_modules()):
        if isinstance(g, nn.Conv3d):
            k = g.out_channels // n
            t.weight.data.copy_(g.weight.data[m * k:(m + 1) * k])
            if g.bias is not None:
                t.bias.data.copy_(g.bias.data[m * k:(m + 1) * k])
        elif isinstance(g, nn.BatchNorm3d):
            k = g.num_features // n
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(t, attr).data.copy_(getattr(g, attr).data[m * k:(m + 1) * k])
            t.num_batches_tracked.data.copy_(g.num_batches_tracked.data)


class GroupedTopModel(nn.Module):
    """M :class:`~xcardia.finetune.TopModel` members as one network.

    Shapes: ``trunk`` (B, M·C, d, h, w) — member m's samples in channel block m — → logits (B, M, T).
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.n = len(members)
        self.layer4 = _grouped(members[0].layer4, [x.layer4 for x in members])
        self.pool = copy.deepcopy(members[0].pool)
        self.feature_weight = nn.Parameter(torch.stack([x.feature.weight.detach() for x in members]).clone())
        self.feature_bias = nn.Parameter(torch.stack([x.feature.bias.detach() for x in members]).clone())
        self.head_weight = nn.Parameter(torch.stack([x.heads.weight.detach() for x in members]).clone())
        self.head_bias = nn.Parameter(torch.stack([x.heads.bias.detach() for x in members]).clone())
        self.train_batchnorm = members[0].train_batchnorm

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(self.layer4(trunk)).flatten(1).view(trunk.shape[0], self.n, -1)  # (B, M, P)
        feature = torch.einsum("bmp,mfp->bmf", pooled, self.feature_weight) + self.feature_bias
        return torch.einsum("bmf,mtf->bmt", feature, self.head_weight) + self.head_bias

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.train_batchnorm:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def member_parameters(self) -> list[nn.Parameter]:
        """Every parameter; each reshapes to (M, -1) with member m in row m."""
        return list(self.parameters())

    def member(self, m: int, template: nn.Module) -> nn.Module:
        """Member ``m`` as a stand-alone model (``template``: a TopModel of the same structure, overwritten)."""
        _ungrouped(self.layer4, template.layer4, m, self.n)
        with torch.no_grad():
            template.feature.weight.copy_(self.feature_weight[m])
            template.feature.bias.copy_(self.feature_bias[m])
            template.heads.weight.copy_(self.head_weight[m])
            template.heads.bias.copy_(self.head_bias[m])
        return template


def _clip_per_member(parameters: list[nn.Parameter], n: int, max_norm: float) -> None:
    """``torch.nn.utils.clip_grad_norm_`` applied to each member's gradients separately."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()  # (M,)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(n, *([1] * (g.dim() - 1))) if g.shape[0] == n else
               scale.repeat_interleave(g.shape[0] // n).view(-1, *([1] * (g.dim() - 1))))


def train_kshot_grouped(members: list[nn.Module], trunk: torch.Tensor, rows: list[np.ndarray], targets: list[np.ndarray],
                        seeds: list[int], spec: FinetuneSpec, epochs: int) -> GroupedTopModel:
    """:func:`xcardia.finetune.train_public_protocol` for M members at once, each on its own rows, fixed ``epochs``.

    Args:
        members: M freshly built TopModels (each initialised under its own seed, as ``train_top`` builds them).
        trunk: (N, C, d, h, w) frozen-trunk activations indexed by ``rows``.
        rows: M arrays of the same length n: member m's training rows (positions in ``trunk``).
        targets: M arrays (n, T): member m's labels (NaN = missing).
        seeds: M seeds: member m's epoch orders come from ``torch.Generator().manual_seed(seeds[m])``.
        spec: the protocol (micro-batch, accumulation, clipping, OneCycle, AdamW).
        epochs: epochs to train (no early stopping: k-shot has no validation labels).
    """
    n_members, n = len(members), len(rows[0])
    if any(len(r) != n for r in rows):
        raise ValueError("every member of a grouped run needs the same number of training rows")
    model = GroupedTopModel(members)
    params = model.member_parameters()
    y = torch.as_tensor(np.stack(targets, axis=1), dtype=torch.float32)  # (n, M, T)
    pos_weight = torch.stack([pos_weight_from_subset(y[:, m], spec.pos_weight_cap) for m in range(n_members)])
    optimizer, scheduler = public_optimizer(params, spec, n, epochs, span=spec.kshot_schedule == "span")
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    rows_t = torch.as_tensor(np.stack(rows))  # (M, n)
    member_index = torch.arange(n_members)
    micro = 0
    optimizer.zero_grad(set_to_none=True)
    for _epoch in range(epochs):
        model.train()
        orders = torch.stack([torch.randperm(n, generator=g) for g in generators])  # (M, n)
        for i in range(0, n, spec.batch_size):
            take = orders[:, i:i + spec.batch_size]  # (M, b)
            x = trunk[rows_t[member_index[:, None], take]]  # (M, b, C, d, h, w)
            x = x.transpose(0, 1).reshape(take.shape[1], -1, *trunk.shape[2:])  # (b, M·C, d, h, w)
            target = y[take.T, member_index[None, :]]  # (b, M, T)
            logits = model(x)
            observed = ~torch.isnan(target)
            per_entry = nn.functional.binary_cross_entropy_with_logits(
                logits, torch.nan_to_num(target), pos_weight=pos_weight, reduction="none") * observed
            # each member's masked mean (Finetuning.py:462-476); members are parameter-disjoint, so the sum's
            # gradient on member m is its own loss's
            loss = (per_entry.sum(dim=(0, 2)) / observed.sum(dim=(0, 2)).clamp(min=1)).sum()
            (loss / spec.grad_accum_steps).backward()
            micro += 1
            if micro % spec.grad_accum_steps == 0:
                _clip_per_member(params, n_members, spec.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            if scheduler.last_epoch + 1 < scheduler.total_steps:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    scheduler.step()
    return model


@torch.no_grad()
def predict_grouped(model: GroupedTopModel, trunk: torch.Tensor, batch: int = 64) -> np.ndarray:
    """Probabilities (N, M, T) of every member on every row of ``trunk`` (N, C, d, h, w)."""
    model.eval()
    out = [torch.sigmoid(model(trunk[i:i + batch].repeat(1, model.n, 1, 1, 1))) for i in range(0, len(trunk), batch)]
    return torch.cat(out).numpy()
