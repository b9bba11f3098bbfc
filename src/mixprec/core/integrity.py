"""Reading a checkpoint file safely: refuse a truncated or corrupted file, and one whose
unpickling would build anything but tensors and plain values, before it is used.

`torch.save` writes a zip archive with a CRC-32 of each part, but `torch.load` does not
check them: a flipped bit in a tensor's bytes loads silently as a wrong weight. Here the
archive is checked first (one read of the file), then loaded with `weights_only=True`,
whose unpickler builds only tensors, containers and plain values and calls nothing else,
so a file crafted to run code on loading is refused without running it.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["safe_load", "verify_archive"]

_EARLIER = "Load an earlier checkpoint: an interrupted save never replaces the file it was writing."
# What torch's weights-only unpickler says about objects it may not build (not corruption).
_UNSAFE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)|not an allowed global|allowlist")


def verify_archive(path: str | os.PathLike) -> None:
    """Raise a ValueError if `path` is not a complete zip archive whose parts all match
    their CRC-32 (torch.save's format); reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise ValueError(
            f"{path} is truncated or corrupted: it is not a complete torch checkpoint archive "
            f"({error}). {_EARLIER}"
        ) from error
    if bad is not None:
        raise ValueError(
            f"{path} is corrupted: the bytes of its part {bad!r} do not match the checksum "
            f"written with them. {_EARLIER}"
        )


def safe_load(path: str | os.PathLike, map_location: Any = None) -> Any:
    """`torch.load(path, weights_only=True)` after `verify_archive(path)`, with a clear
    ValueError for a corrupted file and for one that needs more than tensors and plain
    values (nothing in such a file is run)."""
    path = Path(path)
    verify_archive(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        unsafe = _UNSAFE.search(str(error))
        if unsafe is None:
            raise ValueError(f"{path} is corrupted: {error}. {_EARLIER}") from error
        what = unsafe.group(1) or "an object that is not a tensor or plain value"
        raise ValueError(
            f"{path} was refused, and nothing in it was run: loading it would call {what}, "
            "and mixprec loads checkpoints with weights_only=True, which builds tensors and "
            "plain values only (all a mixprec checkpoint holds). Do not load this file unless "
            "you know where it came from."
        ) from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is corrupted: {error}. {_EARLIER}") from error
