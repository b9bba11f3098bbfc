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
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

__all__ = ["CheckpointError", "safe_load", "verify_archive"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: truncated, corrupted or unsafe. The message
    names the file. (A write that fails, a full disk included, is an OSError.)"""


_EARLIER = "Load an earlier checkpoint: an interrupted save never replaces the file it was writing."
# What torch's weights-only unpickler says about objects it may not build (not corruption).
_UNSAFE = re.compile(
    r"(?:unsupported global:? GLOBAL|unsupported GLOBAL|call reduce for) ([\w.]+)"
    r"|not an allowed global|allowlist|is blocked",
    re.IGNORECASE,
)
# What reading a damaged archive can raise, from zipfile, zlib and the file system.
_READ_ERRORS = (
    zipfile.BadZipFile,
    EOFError,
    ValueError,
    NotImplementedError,  # a compression method zipfile does not have
    RuntimeError,  # "File ... is encrypted, password required"
    zlib.error,
    OSError,
    struct.error,
    KeyError,
    IndexError,
    OverflowError,
    UnicodeDecodeError,
)


def verify_archive(path: str | os.PathLike) -> None:
    """Raise a ValueError if `path` is not a complete zip archive whose parts all match
    their CRC-32 (torch.save's format); reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except _READ_ERRORS as error:
        raise CheckpointError(
            f"{path} is truncated or corrupted: it is not a complete torch checkpoint archive "
            f"({error}). {_EARLIER}"
        ) from error
    if bad is not None:
        raise CheckpointError(
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
            raise CheckpointError(f"{path} is corrupted: {_reason(error)}. {_EARLIER}") from None
        what = unsafe.group(1) or "an object that is not a tensor or plain value"
        raise CheckpointError(
            f"{path} was refused as unsafe, and nothing in it was run: loading it would call "
            f"{what}, and mixprec loads checkpoints with weights_only=True, which builds "
            "tensors and plain values only (all a mixprec checkpoint holds). Do not load this "
            "file unless you know where it came from."
        ) from None
    except Exception as error:  # anything else a damaged file makes torch raise
        raise CheckpointError(f"{path} is corrupted: {_reason(error)}. {_EARLIER}") from None


def _reason(error: BaseException) -> str:
    """The gist of a loading error, without torch's advice to load with weights_only=False."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    kept = [line for line in lines if "weights_only" not in line and "torch.load" not in line]
    return f"{type(error).__name__}: {' '.join(kept[:2]) or 'unreadable'}"
