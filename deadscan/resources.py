"""Files shipped with deadscan (sample models, report templates); no torch, so ``report`` starts fast."""

from __future__ import annotations

from pathlib import Path


def resource_path(folder: str, name: str) -> Path:
    """A file shipped with deadscan: inside the installed package, or the source checkout."""
    from importlib import resources

    try:
        p = Path(str(resources.files(f"deadscan.{folder}") / name))
        if p.exists():
            return p
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[1] / folder / name  # deadscan/resources.py -> the checkout
