"""Checkpoint files: atomic saves, safe loads (`weights_only=True`), and the random-number
state that makes a resumed run draw the same numbers as one that never stopped."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.core.integrity import safe_load

__all__ = ["load_checkpoint", "loader_generators", "rng_state", "save_checkpoint", "set_rng_state"]


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` (a mapping, usually; any object `torch.save` takes) to `path` atomically: a
    reader sees the old file or the new one, never half of one. Returns `path` as a Path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name in the same directory (os.replace cannot cross filesystems); opened with
    # "x" rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            # a dict (an OrderedDict state_dict keeps its _metadata) as it is; a Mapping as a dict
            is_plain = isinstance(obj, dict) or not isinstance(obj, Mapping)
            torch.save(obj if is_plain else dict(obj), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows, same filesystem
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(
    path: str | os.PathLike, map_location: torch.device | str | None = None
) -> dict[str, Any]:
    """Load a checkpoint with `torch.load(weights_only=True)`: tensors and plain values only.

    A truncated or corrupted file, or one that would need more than tensors and plain
    values, raises a ValueError and nothing in it is run (see `mixprec.core.integrity`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}; save one first with learn.save(name).")
    obj = safe_load(path, map_location)  # checksums, then torch.load(weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict; got {type(obj).__name__}.")
    return obj


def rng_state(generators: Iterable[torch.Generator] = ()) -> dict[str, Any]:
    """The global torch (CPU and CUDA), Python and NumPy random states, and the states of
    `generators` (e.g. a DataLoader's), as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: Mapping[str, Any], generators: Iterable[torch.Generator] = ()) -> None:
    """Restore what `rng_state` returned (a key a newer version added is ignored)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    generators = list(generators)
    saved = state.get("generators", [])
    if len(saved) != len(generators):
        raise ValueError(
            f"the checkpoint holds {len(saved)} data-loader generator states but this learner's "
            f"training loader has {len(generators)}; build the DataLoader the same way "
            "(generator= or not) as the run that saved it."
        )
    for g, s in zip(generators, saved):
        g.set_state(s)


def loader_generators(loader: Any) -> list[torch.Generator]:
    """A DataLoader's own random generators (its sampler's, its own), each once."""
    found: list[torch.Generator] = []
    for g in (
        getattr(loader, "generator", None),
        getattr(getattr(loader, "sampler", None), "generator", None),
    ):
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found
