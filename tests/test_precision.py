"""The precision plan: bf16 on a CPU only where it has bf16 units, said in one line; layout honoured everywhere."""

from __future__ import annotations

import torch

from xcardia import precision


def test_bf16_on_a_cpu_without_bf16_units_falls_back_to_fp32_and_says_so(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: [])
    p = precision.plan(torch.device("cpu"), bf16=True, channels_last=True)
    assert not p.bf16 and p.channels_last
    assert "no bf16 units" in p.description and "fp32" in p.description
    with p.autocast():
        assert not torch.is_autocast_enabled("cpu")


def test_bf16_on_a_cpu_with_bf16_units_autocasts_convolutions(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    p = precision.plan(torch.device("cpu"), bf16=True, channels_last=True)
    assert p.bf16 and "avx512_bf16" in p.description
    conv = p.model(torch.nn.Conv3d(1, 4, 3))
    x = p.batch(torch.randn(2, 1, 8, 8, 8))
    assert x.is_contiguous(memory_format=torch.channels_last_3d)
    with p.autocast():
        assert conv(x).dtype == torch.bfloat16
    assert precision.plan(torch.device("cpu"), False, False).description == "fp32"
