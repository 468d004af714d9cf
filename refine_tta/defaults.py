"""Where the embedded default model lives (no heavy imports here)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED_MODEL_DIR = REPO_ROOT / "models" / "refine-tiny-deltanet"


def default_model_path() -> str:
    """$REFINE_TTA_MODEL if set, else the embedded model shipped in the repository."""
    return os.environ.get("REFINE_TTA_MODEL") or str(EMBEDDED_MODEL_DIR)
