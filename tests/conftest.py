"""Shared test fixtures: deterministic seeds and the assets folder."""

from __future__ import annotations

import pytest
import torch

from dfquant.assets import asset_path, missing_reason


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def require_asset(*parts: str):
    """Return the asset's path, or skip the test with a reason naming what is missing."""
    p = asset_path(*parts)
    if p is None:
        pytest.skip(missing_reason(*parts))
    return p
