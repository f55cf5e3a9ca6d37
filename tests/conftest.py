"""Shared test fixtures: deterministic seeds, the assets folder, and optional packages.

With ``CI=true`` or ``DFQUANT_REQUIRE_ASSETS=1`` a missing asset, model package or optional extra fails the test
instead of skipping it: CI installs all of them (``make setup``), so a skip there would hide a broken install.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
import torch

from dfquant.zoo.assets import asset_path, missing_reason

#: How to get what a skipped test needs: the Makefile installs the extras and the model packages.
INSTALL_HINT = "run `make setup` (it installs the extras and the packages named in the Makefile's MODEL_PACKAGES)"


def strict() -> bool:
    """True when missing assets and packages must fail the run (CI, or ``DFQUANT_REQUIRE_ASSETS=1``)."""
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("DFQUANT_REQUIRE_ASSETS", "") == "1"


def missing(reason: str) -> None:
    """Skip with ``reason``, or fail with it in strict mode."""
    if strict():
        pytest.fail(f"{reason} (required: CI=true or DFQUANT_REQUIRE_ASSETS=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def require_asset(*parts: str) -> Path:
    """Return the asset's path; skip (fail in strict mode) with a reason naming what is missing."""
    p = asset_path(*parts)
    if p is None:
        missing(missing_reason(*parts))
    assert p is not None
    return p


def require_package(module: str, pypi: str) -> None:
    """Skip (fail in strict mode) unless the module ``module`` of the PyPI package ``pypi`` is importable."""
    if importlib.util.find_spec(module) is None:
        missing(f"package '{pypi}' is not installed: {INSTALL_HINT}")


def require_module(module: str, pypi: str | None = None) -> ModuleType:
    """Import and return ``module``; skip (fail in strict mode) when its package is not installed."""
    require_package(module, pypi or module)
    return importlib.import_module(module)


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> torch.device:
    """Each device a test should run on: the CPU always, CUDA where a GPU is present (skipped elsewhere, with the
    reason; CI has no GPU)."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine")
    return torch.device(request.param)
