"""Where the repository's ``configs/`` live, so commands work from any working directory."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def config_path(relative: str) -> Path:
    """``configs/<relative>`` in the checkout (an existing path given as-is is returned unchanged)."""
    given = Path(relative)
    if given.exists():
        return given
    candidate = REPO_ROOT / "configs" / relative
    if not candidate.exists():
        raise FileNotFoundError(f"config {relative} not found (looked in . and {REPO_ROOT / 'configs'})")
    return candidate
