"""Where the evaluation assets (real weights and data sets) live.

The assets are third-party data and are never copied into the project: they are read from a folder given by the
environment variable ``DFQUANT_ASSETS``, or else from ``../shared/assets`` beside the current directory or beside
the source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "DFQUANT_ASSETS"


def assets_dir() -> Path | None:
    """The assets folder, or None when none is found."""
    env = os.environ.get(ENV_VAR)
    if env:
        p = Path(env).expanduser()
        return p if p.is_dir() else None
    here = Path(__file__).resolve()
    for base in (
        Path.cwd(),
        *Path.cwd().parents[:2],
        here.parents[2],
        here.parents[3] if len(here.parents) > 3 else here,
    ):
        p = base / ".." / "shared" / "assets"
        if p.is_dir():
            return p.resolve()
        p = base / "shared" / "assets"
        if p.is_dir():
            return p.resolve()
    return None


def asset_path(*parts: str) -> Path | None:
    """Path of a file under the assets folder, or None when the folder or the file is missing."""
    root = assets_dir()
    if root is None:
        return None
    p = root.joinpath(*parts)
    return p if p.exists() else None


def missing_reason(*parts: str) -> str:
    """A one-line reason to skip a test or refuse a command when an asset is missing."""
    root = assets_dir()
    if root is None:
        return f"assets folder not found: set {ENV_VAR} or place it at ../shared/assets"
    return f"asset {'/'.join(parts)} not found under {root}"
