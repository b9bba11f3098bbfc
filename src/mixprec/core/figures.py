"""Writing a matplotlib figure to a PNG path (matplotlib itself is imported by the callers)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

__all__ = ["save_figure"]


def save_figure(
    fig: Any, path: str | os.PathLike, title: str | None = None, dpi: int = 100
) -> Path:
    """Title `fig` (if `title`), write it to `path` (its folder made if missing); the Path."""
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
