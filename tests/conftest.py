"""Shared fixtures: tiny synthetic cohorts generated once per test session."""

from __future__ import annotations

import pytest

from xcardia.cohort.generate import CohortSpec, generate_cohort
from xcardia.cohort.render import RenderSpec

#: A cohort small enough to generate in a second, large enough that every split has patients.
TINY_SPEC = CohortSpec(n_patients=40, seed=3, render=RenderSpec((24, 24, 24), 8.0, "heart"),
                       split_fractions=(0.5, 0.2, 0.1, 0.2))


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory):
    """Folder of a 40-patient cohort at 24³ (label maps included)."""
    out = tmp_path_factory.mktemp("tiny_cohort")
    generate_cohort(out, TINY_SPEC, workers=1, progress=False)
    return out
