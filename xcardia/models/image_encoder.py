"""3D CT image encoders from MONAI's ResNet family (the Kensho Hara 3D ResNets the paper uses).

An :class:`ImageEncoder` is a ResNet backbone (no classifier), global average pooling, and a linear map to the
paper's 128-d image feature. Pretraining adds a projection MLP (128 → 256 → 256) on top; fine-tuning adds task
heads. Presets: ``paper`` = ResNet-50 (Bottleneck, widths 64–512, 2048-d pooled features); the CPU presets are
narrow ResNet-10/18 that train at 100–250 volumes/s at 32³ on 2 cores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from xcardia.errors import XcardiaError

ARCHITECTURES = {
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


@dataclass(frozen=True)
class ImageEncoderSpec:
    """Architecture of the image encoder.

    Attributes:
        arch: ``resnet10``, ``resnet18``, ``resnet34`` or ``resnet50``.
        widths: channels of the four stages (ResNet-50 multiplies by 4 inside its bottlenecks).
        conv1_size: stem kernel size (isotropic).
        conv1_stride: stem stride, an int or one per axis; the paper's stem keeps the slice axis (our Z) at
            stride 1: (2, 2, 1).
        max_pool: max-pool after the stem.
        feature_dim: the image feature size (the paper: 128).
        norm: ``batch`` (the paper), ``instance`` or ``group`` (8 groups); the last two do not depend on the batch,
            which matters at the small per-GPU batches of 3-D training.
        bias_downsample: a bias in the shortcut's 1×1×1 convolution (MONAI's default); Hara's ResNet, which the
            public code uses (``Pretrain/resnet.py:37-42, 194-197``), has none.
        input_axes: ``xyz`` (the companion's RAS volumes as they are) or ``zyx``: the volume is transposed to
            (slice, row, column) before the stem, the D, H, W order in which the public code reads its ``.npy``
            volumes (``Finetuning.py:256``), so that its stem's stride-1 axis is the slice axis and its weights
            apply to the axes they were trained on.
    """

    arch: str = "resnet18"
    widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    conv1_size: int = 7
    conv1_stride: int | tuple[int, int, int] = 2
    max_pool: bool = True
    feature_dim: int = 128
    norm: str = "batch"
    bias_downsample: bool = True
    input_axes: str = "xyz"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"] = list(self.widths)
        d["conv1_stride"] = list(self.conv1_stride) if isinstance(self.conv1_stride, tuple) else self.conv1_stride
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ImageEncoderSpec":
        stride = d["conv1_stride"]
        return cls(arch=d["arch"], widths=tuple(d["widths"]), conv1_size=int(d["conv1_size"]),
                   conv1_stride=tuple(stride) if isinstance(stride, (list, tuple)) else int(stride),
                   max_pool=bool(d["max_pool"]), feature_dim=int(d["feature_dim"]), norm=d.get("norm", "batch"),
                   bias_downsample=bool(d.get("bias_downsample", True)), input_axes=d.get("input_axes", "xyz"))


#: The public code's encoder (``Pretrain/resnet.py`` ``generate_model(50, n_input_channels=1, conv1_t_size=7,
#: conv1_t_stride=1)``, ``Pretraining.py:490-499``, 2048 → 128 ``fc_img`` at :232): Hara's 3D ResNet-50 with
#: shortcut B and bias-free downsampling, stem kernel 7³ with stride (1, 2, 2) over (D, H, W), max-pool. Built from
#: MONAI's ResNet, whose key names and shapes then equal the public model's (``tests/fixtures/``).
PUBLIC_ARCHITECTURE = ImageEncoderSpec(arch="resnet50", widths=(64, 128, 256, 512), conv1_size=7,
                                       conv1_stride=(1, 2, 2), max_pool=True, feature_dim=128,
                                       bias_downsample=False, input_axes="zyx")


class ImageEncoder(nn.Module):
    """CT volume (B, 1, X, Y, Z) → 128-d image feature (B, feature_dim).

    ``trunk`` (stem to stage 3) and ``top`` (stage 4, pooling, feature map) split the network where the paper's
    fine-tuning freezes it, so a frozen trunk's output can be computed once and cached.
    """

    def __init__(self, spec: ImageEncoderSpec):
        super().__init__()
        from monai.networks.nets import ResNet

        if spec.arch not in ARCHITECTURES:
            raise XcardiaError(f"unknown image encoder {spec.arch!r}; choose one of {', '.join(ARCHITECTURES)}")
        block, layers = ARCHITECTURES[spec.arch]
        norms = {"batch": "batch", "instance": ("instance", {"affine": True}), "group": ("group", {"num_groups": 8})}
        if spec.input_axes not in ("xyz", "zyx"):
            raise XcardiaError(f"input_axes must be 'xyz' or 'zyx', got {spec.input_axes!r}")
        if spec.norm not in norms:
            raise XcardiaError(f"unknown norm {spec.norm!r}; choose one of {', '.join(norms)}")
        self.spec = spec
        self.backbone = ResNet(block=block, layers=layers, block_inplanes=list(spec.widths), spatial_dims=3,
                               n_input_channels=1, conv1_t_size=spec.conv1_size, conv1_t_stride=spec.conv1_stride,
                               no_max_pool=not spec.max_pool, shortcut_type="B", feed_forward=False,
                               bias_downsample=spec.bias_downsample, norm=norms[spec.norm])
        if spec.norm != "batch":
            # MONAI 1.6's ResNet passes `norm` to its stem only (`_make_layer` is called without it), so the blocks
            # and shortcuts keep BatchNorm: replace those here.
            from monai.networks.layers.utils import get_norm_layer

            _replace_batchnorm(self.backbone, lambda c: get_norm_layer(name=norms[spec.norm], spatial_dims=3, channels=c))
        pooled = spec.widths[3] * (4 if block == "bottleneck" else 1)
        self.pooled_dim = pooled
        self.feature = nn.Linear(pooled, spec.feature_dim)
        #: recompute each ResNet stage in the backward pass instead of storing its activations (GPU memory)
        self.checkpoint_stages = False
        #: under autocast, run stages whose input grid is ≤ 4 voxels wide in fp32 (set by
        #: :meth:`xcardia.precision.Precision.model` where the CPU's bf16 small-grid convolution fails its self-test)
        self.fp32_small_grids = False

    def _stage(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fp32_small_grids and min(x.shape[2:]) <= 4 and torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self._stage_run(layer, x.float())
        return self._stage_run(layer, x)

    def _stage_run(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_stages and self.training and x.requires_grad:
            from torch.utils.checkpoint import checkpoint

            return checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        if self.spec.input_axes == "zyx":
            x = x.permute(0, 1, 4, 3, 2)
        x = b.act(b.bn1(b.conv1(x)))
        if not b.no_max_pool:
            x = b.maxpool(x)
        for layer in (b.layer1, b.layer2, b.layer3):
            x = self._stage(layer, x)
        return x

    def top(self, h: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.avgpool(self._stage(b.layer4, h)).flatten(1)
        return self.feature(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.trunk(x))

    def top_modules(self) -> list[nn.Module]:
        """What the paper's fine-tuning trains: the last ResNet stage and the feature map after it."""
        return [self.backbone.layer4, self.feature]


def _replace_batchnorm(module: nn.Module, make) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm3d):
            replacement = make(child.num_features)
            if getattr(replacement, "weight", None) is not None:
                nn.init.ones_(replacement.weight)
                nn.init.zeros_(replacement.bias)
            setattr(module, name, replacement)
        else:
            _replace_batchnorm(child, make)


class ProjectionHead(nn.Module):
    """The paper's projection MLP: Linear → ReLU → Linear (128 → 256 → 256)."""

    def __init__(self, in_dim: int, out_dim: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(inplace=True), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
