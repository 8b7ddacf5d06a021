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


@dataclass(frozen=True)
class Profile:
    """All settings of one named profile.

    Attributes:
        name: profile name.
        cohort: the synthetic cohort it generates.
        generate_workers: processes used to generate the cohort.
        notebook_timeout_s: papermill execution timeout per notebook cell.
    """

    name: str
    cohort: CohortSpec
    generate_workers: int = 2
    notebook_timeout_s: int = 1800
    extra: dict = field(default_factory=dict)

    def with_cohort(self, **changes) -> "Profile":
        return replace(self, cohort=replace(self.cohort, **changes))


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        cohort=CohortSpec(n_patients=300, seed=0, render=RenderSpec((32, 32, 32), 6.0, "heart"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
        generate_workers=2,
        notebook_timeout_s=600,
    ),
    "cpu": Profile(
        name="cpu",
        cohort=CohortSpec(n_patients=4000, seed=0, render=RenderSpec((32, 32, 32), 6.0, "heart"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
        generate_workers=2,
        notebook_timeout_s=3600,
    ),
    "paper": Profile(
        name="paper",
        cohort=CohortSpec(n_patients=20574, seed=0, render=RenderSpec((164, 164, 164), 2.0, "chest"),
                          split_fractions=(0.5, 0.2, 0.1, 0.2)),
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
