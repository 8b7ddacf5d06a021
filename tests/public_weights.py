"""Deterministic, well-scaled weights for a model in the public code's naming — the recipe the public-forward
fixture (``tests/fixtures/public_resnet50_forward.json``) was computed with, shared by that fixture's generator and
the tests that load those weights through xcardia."""

from __future__ import annotations

import math

import torch


def public_like_state(shapes: dict[str, list[int]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with ``shapes`` (key → shape, in the given order): He-scaled convolutions and linears, BatchNorm
    with positive running variances, so a forward pass stays finite and every tensor matters to the output."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        shape = list(shape)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(0)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("running_mean"):
            out[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1 and key.endswith(".weight"):  # BatchNorm scale
            out[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith(".bias"):
            out[key] = 0.01 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
            out[key] = torch.randn(shape, generator=g) * math.sqrt(1.0 / fan_in)
    return out


def public_input(seed: int = 1) -> torch.Tensor:
    """The fixture's input, (1, 1, D, H, W) = (1, 1, 40, 48, 56) as the public model reads a volume."""
    return torch.randn(1, 1, 40, 48, 56, generator=torch.Generator().manual_seed(seed))
