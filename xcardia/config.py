"""Named profiles (``smoke``, ``cpu``, ``paper``): plain frozen dataclasses, built the same way by the CLI and
the notebooks. A profile fixes the cohort, the models, pretraining, fine-tuning and evaluation settings.

- ``smoke``: CI. A few hundred patients at 32³, a small encoder, a few epochs; proves the pipeline runs. Its numbers
  mean nothing.
- ``cpu``: the reference run a laptop finishes in about an hour. Heart-centred field of view (192 mm at 6 mm),
  because at CPU-sized volumes a whole-chest view (10 mm voxels) leaves the heart a dozen voxels wide.
- ``paper``: the paper's settings: ResNet-50, 164³ at 2 mm (whole chest), 20,574 patients; for GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from xcardia.cohort.generate import CohortSpec
from xcardia.cohort.render import RenderSpec
from xcardia.data.imaging import PreprocessSpec
from xcardia.finetune import FinetuneSpec
from xcardia.models.image_encoder import ImageEncoderSpec
from xcardia.models.xcardia_model import ModelSpec
from xcardia.pretrain import PretrainSpec


@dataclass(frozen=True)
class Profile:
    """All settings of one named profile.

    Attributes:
        name: profile name.
        cohort: the synthetic cohort it generates.
        model: encoder architectures (the variant's temperatures are applied per run).
        pretrain: pretraining hyper-parameters shared by every run of the profile.
        pretrain_runs: named pretraining runs: name → overrides of ``pretrain`` (method, variant, query, …).
        finetune: downstream protocols, fractions, k-shot settings and bootstrap size.
        generate_workers: processes used to generate the cohort.
        notebook_timeout_s: papermill execution timeout per notebook cell.
    """

    name: str
    cohort: CohortSpec
    model: ModelSpec
    pretrain: PretrainSpec
    pretrain_runs: dict = field(default_factory=dict)
    finetune: FinetuneSpec = field(default_factory=FinetuneSpec)
    generate_workers: int = 2
    notebook_timeout_s: int = 1800

    def with_cohort(self, **changes) -> "Profile":
        return replace(self, cohort=replace(self.cohort, **changes))

    def with_seed(self, seed: int) -> "Profile":
        """The same profile with ``seed`` for the cohort and for everything trained."""
        return replace(self, cohort=replace(self.cohort, seed=seed), pretrain=replace(self.pretrain, seed=seed))

    @property
    def preprocess(self) -> PreprocessSpec:
        """CTs are prepared at the cohort's geometry (a synthetic cohort needs no resampling)."""
        return PreprocessSpec(shape=self.cohort.render.shape, spacing_mm=self.cohort.render.spacing_mm)


#: The three methods every profile pretrains, and the extra run of the CPU reference: X-Cardia whose NW query is
#: the image embedding alone (DESIGN §4, "beyond the paper").
CORE_RUNS = {"clip": {"method": "clip"}, "xcardia": {"method": "xcardia"}, "nw_only": {"method": "nw_only"}}
CPU_RUNS = {**CORE_RUNS, "xcardia_image_query": {"method": "xcardia", "nw_query": "image"}}
SMALL_TABULAR = dict(tabular_d_model=64, tabular_layers=2, tabular_heads=4, tabular_ff=128)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        cohort=CohortSpec(n_patients=300, seed=0, render=RenderSpec((32, 32, 32), 6.0, "heart"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
        model=ModelSpec(image=ImageEncoderSpec(arch="resnet10", widths=(16, 32, 64, 128), conv1_size=5,
                                               conv1_stride=2, max_pool=False), **SMALL_TABULAR),
        pretrain=PretrainSpec(epochs=2, batch_size=16, lr=1e-3, restart_period=2, bank_refresh_every=1,
                              in_memory=True),
        pretrain_runs=CORE_RUNS,
        finetune=FinetuneSpec(max_epochs=5, patience=2, kshot_epochs=10, scratch_all_max_epochs=2,
                              fractions=(0.1, 1.0), fraction_seeds=(123,), ks=(1, 5), kshot_seeds=3,
                              kshot_paper_ks=(5,), n_boot=200),
        generate_workers=2,
        notebook_timeout_s=600,
    ),
    "cpu": Profile(
        name="cpu",
        cohort=CohortSpec(n_patients=4000, seed=0, render=RenderSpec((32, 32, 32), 6.0, "heart"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
        model=ModelSpec(image=ImageEncoderSpec(arch="resnet18", widths=(16, 32, 64, 128), conv1_size=5,
                                               conv1_stride=2, max_pool=False), **SMALL_TABULAR),
        pretrain=PretrainSpec(epochs=10, batch_size=32, lr=5e-4, restart_period=10, bank_refresh_every=2,
                              in_memory=True),
        pretrain_runs=CPU_RUNS,
        # the paper's protocol at k = 5 and 25 (the linear probe at every k) keeps the run near an hour on 2 cores
        finetune=FinetuneSpec(kshot_epochs=25, kshot_paper_ks=(5, 25)),
        generate_workers=2,
        notebook_timeout_s=3600,
    ),
    "paper": Profile(
        name="paper",
        cohort=CohortSpec(n_patients=20574, seed=0, render=RenderSpec((164, 164, 164), 2.0, "chest"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
        model=ModelSpec(image=ImageEncoderSpec(arch="resnet50", widths=(64, 128, 256, 512), conv1_size=7,
                                               conv1_stride=(2, 2, 1), max_pool=True)),
        pretrain=PretrainSpec(epochs=80, batch_size=8, lr=1e-4, num_workers=8, bf16=True, channels_last=True),
        pretrain_runs=CORE_RUNS,
        generate_workers=16,
        notebook_timeout_s=7 * 24 * 3600,
    ),
}


def get_profile(name: str) -> Profile:
    """The profile called ``name``; a clear error lists the valid names otherwise."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown profile {name!r}; choose one of: {', '.join(PROFILES)}") from None
