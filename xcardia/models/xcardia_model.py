"""The pretraining model: image and tabular encoders, their projections, and the two temperatures.

    e_img = P_img(f_img(CT))          (B, 256)
    e_tab = P_tab(f_tab(ECHO, ECG))   (B, 256)
    L     = L_clip(e_img, e_tab) + λ_nw · L_nw(NW(q; bank), concepts)

with the NW query ``q = normalize(e_img + e_tab)`` (the paper's fused query) or ``normalize(e_img)`` (image-only,
so that only the image encoder can satisfy the phenotype loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from xcardia.losses import LearnableTemperature, nw_query
from xcardia.models.image_encoder import ImageEncoder, ImageEncoderSpec, ProjectionHead
from xcardia.models.tabular_encoder import FeatureTokenTransformer, TabularMLP


@dataclass(frozen=True)
class ModelSpec:
    """Architecture and temperatures of the pretraining model.

    Attributes:
        image: image encoder architecture.
        tabular: ``"transformer"`` (the paper) or ``"mlp"``.
        tabular_d_model, tabular_layers, tabular_heads, tabular_ff: transformer size (paper: 256, 3, 8, 1024).
        tabular_dropout: transformer dropout (PyTorch's default 0.1, as the paper).
        proj_dim: projection size (paper: 256).
        clip_temperature: CLIP τ (paper: 0.07, fixed).
        learnable_clip_temperature: learn CLIP's logit scale (clamped at ln 100).
        nw_temperature: NW τ (paper: 1.0, which with cosine similarity gives near-uniform weights).
        learnable_nw_temperature: learn the NW τ.
        tabular_init: ``default`` (PyTorch's initialisation) or ``xavier``: every Linear of the tabular transformer
            Xavier-uniform with zero bias, as the public encoder does (``Pretraining.py:206-211``).
    """

    image: ImageEncoderSpec = field(default_factory=ImageEncoderSpec)
    tabular: str = "transformer"
    tabular_d_model: int = 256
    tabular_layers: int = 3
    tabular_heads: int = 8
    tabular_ff: int = 1024
    tabular_dropout: float = 0.1
    proj_dim: int = 256
    clip_temperature: float = 0.07
    learnable_clip_temperature: bool = False
    nw_temperature: float = 1.0
    learnable_nw_temperature: bool = False
    tabular_init: str = "default"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"] = self.image.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        d["image"] = ImageEncoderSpec.from_dict(d["image"])
        return cls(**d)


class XCardiaModel(nn.Module):
    """Image and tabular towers with projections (the paper's ``MultiModalNW`` without its fixed NW buffers)."""

    def __init__(self, spec: ModelSpec, n_tabular_features: int):
        super().__init__()
        self.spec = spec
        self.image_encoder = ImageEncoder(spec.image)
        self.image_projection = ProjectionHead(spec.image.feature_dim, spec.proj_dim)
        if spec.tabular == "transformer":
            self.tabular_encoder = FeatureTokenTransformer(n_tabular_features, spec.tabular_d_model, spec.tabular_layers,
                                                           spec.tabular_heads, spec.tabular_ff, out_dim=spec.proj_dim,
                                                           dropout=spec.tabular_dropout)
            if spec.tabular_init == "xavier":
                for m in self.tabular_encoder.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
                        if m.bias is not None:
                            nn.init.zeros_(m.bias)
        elif spec.tabular == "mlp":
            self.tabular_encoder = TabularMLP(n_tabular_features, spec.tabular_d_model, out_dim=spec.proj_dim)
        else:
            raise ValueError(f"tabular must be 'transformer' or 'mlp', got {spec.tabular!r}")
        self.tabular_projection = ProjectionHead(self.tabular_encoder.out_dim, spec.proj_dim)
        self.clip_temperature = LearnableTemperature(spec.clip_temperature, spec.learnable_clip_temperature)
        self.nw_temperature = LearnableTemperature(spec.nw_temperature, spec.learnable_nw_temperature)

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, X, Y, Z) → (B, proj_dim)."""
        return self.image_projection(self.image_encoder(image))

    def embed_tabular(self, values: torch.Tensor, missing: torch.Tensor) -> torch.Tensor:
        """(B, F) values and missing mask → (B, proj_dim)."""
        return self.tabular_projection(self.tabular_encoder(values, missing))

    def forward(self, image: torch.Tensor, values: torch.Tensor, missing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed_image(image), self.embed_tabular(values, missing)

    @staticmethod
    def nw_query(e_img: torch.Tensor, e_tab: torch.Tensor | None, mode: str) -> torch.Tensor:
        """The NW query: ``"fused"`` = normalize(e_img + e_tab) (paper), ``"image"`` = normalize(e_img)."""
        return nw_query(e_img, e_tab, mode)
