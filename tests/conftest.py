"""Shared fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache (tiny model, SVDs, teacher pool) per test module, announced through the environment."""
    path = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("PROJECTED_GRPO_CACHE", str(path))
    yield path
    mp.undo()
