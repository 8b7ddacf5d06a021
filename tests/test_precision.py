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


def test_a_failed_small_grid_self_test_keeps_the_small_stages_fp32(monkeypatch):
    from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "bf16_small_grid_convolutions_ok", lambda: False)
    p = precision.plan(torch.device("cpu"), bf16=True, channels_last=False)
    assert p.bf16 and p.fp32_small_grids and "fp32" in p.description and "self-test" in p.description
    spec = ImageEncoderSpec(arch="resnet10", widths=(8, 8, 8, 8), conv1_size=5, conv1_stride=2, max_pool=False)
    encoder = p.model(ImageEncoder(spec))
    assert encoder.fp32_small_grids
    dtypes = {}
    for name in ("layer1", "layer3", "layer4"):
        getattr(encoder.backbone, name).register_forward_hook(lambda m, i, o, name=name: dtypes.update({name: o.dtype}))
    with p.autocast():
        out = encoder(torch.randn(2, 1, 32, 32, 32))
    # 32³ → stem 16³ → layer1 16³, layer2 8³, layer3 4³, layer4 2³: the stage fed a 4³ grid runs in fp32
    assert dtypes == {"layer1": torch.bfloat16, "layer3": torch.bfloat16, "layer4": torch.float32}
    assert torch.isfinite(out).all()


def test_a_passed_self_test_leaves_every_stage_to_autocast(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "bf16_small_grid_convolutions_ok", lambda: True)
    p = precision.plan(torch.device("cpu"), bf16=True, channels_last=False)
    assert p.bf16 and not p.fp32_small_grids and "self-test" not in p.description
    assert not precision.plan(torch.device("cpu"), False, False).fp32_small_grids


def test_the_small_grid_self_test_answers_on_this_machine():
    """Runs the real self-test: a bool, the same on a second call; where it fails, the failure is the defect it
    describes (the bf16 weight gradient of that convolution is far from fp32's), not bf16 rounding."""
    precision.bf16_small_grid_convolutions_ok.cache_clear()
    first = precision.bf16_small_grid_convolutions_ok()
    precision.bf16_small_grid_convolutions_ok.cache_clear()
    assert first is precision.bf16_small_grid_convolutions_ok()
    conv = torch.nn.Conv3d(16, 16, 3, padding=1, bias=False)
    x = torch.randn(8, 16, 3, 3, 3)  # a 3³ grid: right to bf16 rounding on every CPU met so far
    grads = []
    for bf16 in (False, True):
        conv.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            conv(x).float().sum().backward()
        grads.append(conv.weight.grad.clone())
    assert (grads[1] - grads[0]).norm() <= 0.05 * grads[0].norm()


def test_the_paper_profile_trains_in_fp32_on_a_cpu_and_in_bf16_on_a_gpu(monkeypatch):
    """Issue 30.6: the public code trains in fp32; the ``paper`` profile's bf16 is a GPU setting (register P11) — on a
    CPU with bf16 units it stays fp32 unless asked (``--bf16``)."""
    from xcardia.config import get_profile

    monkeypatch.setattr(precision, "cpu_bf16_units", lambda: ["avx512_bf16"])
    requested = get_profile("paper").pretrain.bf16
    on_cpu = precision.plan(torch.device("cpu"), requested, channels_last=False)
    assert not on_cpu.bf16 and "fp32" in on_cpu.description and "--bf16" in on_cpu.description
    assert precision.plan(torch.device("cuda"), requested, channels_last=False).bf16
    monkeypatch.setattr(precision, "bf16_small_grid_convolutions_ok", lambda: True)
    assert precision.plan(torch.device("cpu"), True, channels_last=False).bf16  # asked for
