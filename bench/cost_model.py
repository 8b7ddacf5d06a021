"""Cost model of the ``paper`` profile without a GPU.

Method:

- **FLOPs** per sample of the paper's encoder (ResNet-50, 164³) are counted by ``torch.utils.flop_counter`` on the
  ``meta`` device (shapes only, no arithmetic). Training ≈ 3 × forward (backward ≈ 2 × forward).
- **Activation memory** is the bytes of the tensors autograd saves for backward, counted with
  ``torch.autograd.graph.saved_tensors_hooks``. It is measured on the CPU with real tensors at small shapes, and the
  same count on ``meta`` tensors at those shapes must agree; the count at 164³ then comes from ``meta`` (equivalent
  to extrapolating the per-voxel cost, which the small shapes show to be constant). bf16 halves every saved tensor
  (an upper bound on the saving: normalisation statistics stay fp32). Activation checkpointing of the four ResNet
  stages keeps only each stage's input plus, at any time, the largest stage's internals.
- **Wall time** of 20,574 patients × 80 epochs: training FLOPs / (GPU peak bf16 × an assumed utilisation), on 1
  and 8 GPUs (8 at an assumed 90 % scaling efficiency). The GPU classes, peaks and utilisation are stated beside
  the numbers; only a real run (``bench/gpu_check.py``) replaces the assumption.
"""

from __future__ import annotations

import torch

GPU_CLASSES = {"NVIDIA A100 80GB (312 TFLOP/s bf16 dense)": 312e12, "NVIDIA H100 SXM (989 TFLOP/s bf16 dense)": 989e12}
ASSUMED_UTILISATION = 0.35
ASSUMED_SCALING_EFFICIENCY = 0.9
PAPER_PATIENTS, PAPER_EPOCHS, PAPER_BATCH = 20574, 80, 8


def _encoder(device: str, dtype=torch.float32):
    from xcardia.config import get_profile
    from xcardia.models.image_encoder import ImageEncoder

    with torch.device(device):
        return ImageEncoder(get_profile("paper").model.image).to(dtype)


def forward_flops(shape: int, device: str = "meta") -> int:
    """FLOPs of one forward pass of the paper encoder on one (1, shape³) volume."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _encoder(device)
    x = torch.zeros(1, 1, shape, shape, shape, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


def saved_bytes(shape: int, device: str = "meta", dtype=torch.float32, module: str | None = None) -> int:
    """Bytes autograd saves for backward in one training forward pass of the paper encoder (or one of its stages:
    ``module`` = ``layer1`` … ``layer4``, fed its real input shape)."""
    model = _encoder(device, dtype).train()
    x = torch.zeros(1, 1, shape, shape, shape, device=device, dtype=dtype, requires_grad=True)
    total = 0
    weights = {id(p) for p in model.parameters()}  # saved weights are not activations
    seen: set[int] = set()

    def pack(t):
        nonlocal total
        key = id(t) if t.device.type == "meta" else t.untyped_storage().data_ptr()
        if id(t) not in weights and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    if module is None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return total
    b = model.backbone
    with torch.no_grad():
        h = b.maxpool(b.act(b.bn1(b.conv1(x)))) if not b.no_max_pool else b.act(b.bn1(b.conv1(x)))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            if name == module:
                break
            h = getattr(b, name)(h)
    h = h.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        getattr(b, module)(h)
    return total + h.numel() * h.element_size()  # + the stage input that checkpointing keeps


def cost_model(validation_shapes=(32, 48)) -> dict:
    """FLOPs, activation memory and projected wall time of the paper profile (see the module docstring)."""
    gib = 1024**3
    validation = []
    for shape in validation_shapes:
        cpu, meta = saved_bytes(shape, "cpu"), saved_bytes(shape, "meta")
        validation.append({"shape": shape, "cpu_saved_bytes": cpu, "meta_saved_bytes": meta,
                           "bytes_per_voxel": cpu / shape**3})
    fwd = forward_flops(164)
    act_fp32 = saved_bytes(164)
    act_bf16 = saved_bytes(164, dtype=torch.bfloat16)
    stages = {name: saved_bytes(164, module=name) for name in ("layer1", "layer2", "layer3", "layer4")}
    stem = act_fp32 - sum(stages.values())  # the stem and pooling, stored without checkpointing
    checkpointed = max(stem, 0) + max(stages.values())
    params = sum(p.numel() for p in _encoder("meta").parameters())
    train_flops = 3 * fwd * PAPER_PATIENTS * PAPER_EPOCHS
    projections = {}
    for gpu, peak in GPU_CLASSES.items():
        one = train_flops / (peak * ASSUMED_UTILISATION)
        projections[gpu] = {"1_gpu_hours": one / 3600, "8_gpu_hours": one / (8 * ASSUMED_SCALING_EFFICIENCY) / 3600}
    return {
        "encoder": "ResNet-50 (MONAI), 164³ at 2 mm, stem stride (2, 2, 1)",
        "parameters": params,
        "forward_gflops_per_sample": fwd / 1e9,
        "training_gflops_per_sample": 3 * fwd / 1e9,
        "activation_gib_per_sample_fp32": act_fp32 / gib,
        "activation_gib_per_sample_bf16": act_bf16 / gib,
        "activation_gib_per_sample_bf16_checkpointed": checkpointed / 2 / gib,
        "activation_gib_batch8_bf16": 8 * act_bf16 / gib,
        "activation_gib_batch8_bf16_checkpointed": 8 * checkpointed / 2 / gib,
        "weights_grads_adamw_gib": params * 16 / gib,
        "validation_small_shapes": validation,
        "assumed_utilisation": ASSUMED_UTILISATION,
        "assumed_8_gpu_scaling_efficiency": ASSUMED_SCALING_EFFICIENCY,
        "projected_training_time": projections,
    }
