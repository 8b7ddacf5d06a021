"""Numeric precision and memory layout of a training step: fp32, or bfloat16 autocast and ``channels_last_3d``.

On a GPU both are the paper profile's settings. On a CPU, PyTorch's autocast to bfloat16 runs through oneDNN and is
only worth it where the CPU has bf16 units (``avx512_bf16``, ``amx_bf16``: ``/proc/cpuinfo``); without them a bf16
request is refused with a one-line notice and the step stays fp32. ``channels_last_3d`` is a layout only and is
honoured on both. Whether a profile uses them on CPU is decided by a measured side-by-side
(``bench/precision_side_by_side.py``; README, "Performance and scale").

A self-test guards a oneDNN defect met on this project's CPU (AMD EPYC, ``avx512_bf16`` without AMX, torch 2.13 /
oneDNN 3.12): under bf16 autocast, the weight gradient of a 3³ convolution over a 2-voxel-wide grid (the last ResNet
stage of a 32³ volume) is wrong — relative error ≈ 1, sometimes inf or NaN — while every other shape is right to
bf16 rounding (0.3 %). That defect, not bf16 rounding, is what made bf16 pretraining diverge within its first 25
steps. :func:`bf16_small_grid_convolutions_ok` runs that one convolution both ways (a few milliseconds); where it
fails, :meth:`Precision.model` makes the image encoder run its stages on grids ≤ 4 voxels wide in fp32 (they are a
small share of the work), and the log says so.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path

import torch


def cpu_bf16_units() -> list[str]:
    """The bf16 matrix/vector units this CPU reports (``/proc/cpuinfo`` flags): amx_bf16, amx_tile, avx512_bf16."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return [f for f in ("amx_bf16", "amx_tile", "avx512_bf16") if f" {f}" in flags + " "]


@functools.lru_cache(maxsize=None)
def bf16_small_grid_convolutions_ok() -> bool:
    """Whether this CPU's bf16 autocast gives the right weight gradient for a 3³ convolution (padding 1) over a 2³
    grid: finite and within 5 % of fp32 (bf16 rounding gives ≈ 0.3 %). Deterministic inputs; run once per
    process."""
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv3d(16, 16, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.1)
    x = torch.randn(8, 16, 2, 2, 2, generator=g)
    weights = torch.randn(8, 16, 2, 2, 2, generator=g)
    grads = []
    for bf16 in (False, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        (y.float() * weights).sum().backward()
        grads.append(conv.weight.grad.detach().clone())
    fp32, bf16 = grads
    if not torch.isfinite(bf16).all():
        return False
    return bool((bf16 - fp32).norm() <= 0.05 * fp32.norm())


@dataclass(frozen=True)
class Precision:
    """What a step uses: ``bf16`` autocast, ``channels_last`` layout, whether the image encoder's small-grid stages
    stay fp32 (the guard above), and the sentence the log prints."""

    device_type: str
    bf16: bool
    channels_last: bool
    description: str
    fp32_small_grids: bool = False

    def autocast(self):
        """A fresh autocast context (bf16) or a no-op one (fp32)."""
        if self.bf16:
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def model(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` in this layout; its image encoders told to run small-grid stages in fp32 where guarded."""
        if self.fp32_small_grids:
            for m in module.modules():
                if hasattr(m, "fp32_small_grids"):
                    m.fp32_small_grids = True
        return module.to(memory_format=torch.channels_last_3d) if self.channels_last else module

    def batch(self, image: torch.Tensor) -> torch.Tensor:
        return image.contiguous(memory_format=torch.channels_last_3d) if self.channels_last else image


def plan(device: torch.device, bf16: bool | str, channels_last: bool) -> Precision:
    """The precision a run on ``device`` gets for the requested ``bf16`` (True, False, or ``"gpu"``: bf16 on a GPU
    only) and ``channels_last``."""
    notes = []
    small_grids = False
    if bf16 == "gpu":
        if device.type == "cuda":
            bf16 = True
        else:
            notes.append("fp32 (the profile's bf16 is for GPUs; --bf16 asks for it on this device)")
            bf16 = False
    if bf16 and device.type == "cpu":
        units = cpu_bf16_units()
        if units:
            notes.append(f"bf16 autocast on the CPU's {'/'.join(units)}")
            if not bf16_small_grid_convolutions_ok():
                small_grids = True
                notes.append("stages on grids ≤ 4 voxels in fp32 (this CPU's bf16 weight gradient of a 3³ "
                             "convolution over a 2³ grid failed its self-test)")
        else:
            notes.append("bf16 requested but this CPU reports no bf16 units (avx512_bf16, amx_bf16): fp32")
            bf16 = False
    elif bf16:
        notes.append("bf16 autocast")
    elif not notes:
        notes.append("fp32")
    if channels_last:
        notes.append("channels_last_3d")
    return Precision(device.type, bool(bf16), bool(channels_last), ", ".join(notes), small_grids)
