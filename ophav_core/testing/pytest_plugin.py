"""pytest fixtures for plugin authors (loaded through the ``pytest11`` entry point; imports nothing heavy)."""
from __future__ import annotations

import pytest


@pytest.fixture
def ophav_context(tmp_path):
    """A RunContext on the CPU with the ``tiny`` profile, a scratch folder and no progress output."""
    from ophav_core.testing.contracts import tiny_context

    return tiny_context(tmp_path)


@pytest.fixture
def ophav_tracking():
    """Tracking of a synthetic head (8 frames, 64x64)."""
    from ophav_core.testing.synthetic import synthetic_tracking

    return synthetic_tracking(8, 64)
