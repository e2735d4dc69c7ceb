"""The git revision recorded with every run (results.json), for training and for evaluation alike."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_revision() -> str:
    """Commit of the mtssl source tree, with '-dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
