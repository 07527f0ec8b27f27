"""Where this project's shared data lives (real data sets, GPU-measured cost graphs): the
folder ``$PIPEOPTIM_SHARED`` names, else ``shared`` beside the checkout (``../shared``). It is
not part of the repository; what needs it skips, or says where it looked, where it is absent."""

from __future__ import annotations

import os
from pathlib import Path


def shared_folder() -> Path:
    """``$PIPEOPTIM_SHARED``, else ``../shared`` beside the checkout (it may not exist)."""
    named = os.environ.get("PIPEOPTIM_SHARED")
    return Path(named) if named else Path(__file__).resolve().parents[1].parent / "shared"
