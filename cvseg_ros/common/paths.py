"""Where the project finds things outside the package: the team's data and the user's cache."""
from __future__ import annotations

import os
from pathlib import Path

#: the repository root of a source checkout (the folder above the package)
REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path:
    """The real data: ``$CVSEG_SHARED_DATA`` if set, else ``../shared/data`` beside the repository
    root (may not exist)."""
    env = os.environ.get("CVSEG_SHARED_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/cvseg_ros`` (default ``~/.cache/cvseg_ros``): fetched footage, compiled loops."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cvseg_ros"
