"""Checkpoint files: atomic saves, safe loads (`weights_only=True`), and the random-number
state that makes a resumed run draw the same numbers as one that never stopped."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mixprec.core.integrity import CheckpointError, safe_load

__all__ = [
    "STALE_AFTER_S",
    "clean_stale_tmp_files",
    "load_checkpoint",
    "loader_generators",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


# Our temporary files: ".{start of the name}.{host}-{pid}-{random}.mixprec.tmp", short
# enough for any valid final name (255 bytes), telling which process on which host wrote it.
_TMP = re.compile(r"^\..*\.([0-9a-f]{8})-(\d+)-[0-9a-f]{12}\.mixprec\.tmp$")
_OLD_TMP = re.compile(r"^\..+\.pth\.(\d+)\.[0-9a-f]{32}\.tmp$")  # mixprec <= 0.x
STALE_AFTER_S = 24 * 3600.0
"""A temporary file of ours older than this is stale even if its writer cannot be checked."""
_NAME_BYTES = 255


def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_path(path: Path) -> Path:
    suffix = f".{_host()}-{os.getpid()}-{uuid.uuid4().hex[:12]}.mixprec.tmp"
    room = _NAME_BYTES - len(suffix.encode()) - 1
    stem = path.name.encode()[:room].decode(errors="ignore")
    return path.with_name(f".{stem}{suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def clean_stale_tmp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that killed saves left in `folder`: ours only (by name),
    stale only (written by a process of this host that is gone, or older than
    `STALE_AFTER_S`). Returns the paths deleted."""
    removed = []
    now = time.time()
    host, me = _host(), os.getpid()
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        ours, old = _TMP.match(entry.name), _OLD_TMP.match(entry.name)
        if not (ours or old) or not entry.is_file(follow_symlinks=False):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        stale = age > STALE_AFTER_S
        if ours and ours.group(1) == host:
            pid = int(ours.group(2))
            stale = stale or (pid != me and not _alive(pid))
        if stale:
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


class _Writer:
    """The file torch.save writes to, remembering the OS error a write or flush raised (torch
    reports a failed write as "unexpected pos", without the reason)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def fileno(self) -> int:
        return self.f.fileno()

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as error:
            self.error = self.error or error
            raise


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` (a mapping, usually; any object `torch.save` takes) to `path` atomically: a
    reader sees the old file or the new one, never half of one. Returns `path` as a Path.

    Stale temporary files of earlier saves killed part-way are deleted first
    (`clean_stale_tmp_files`). A failed write raises an OSError (its errno kept; a full disk
    says so and names the file); the file that was at `path` is then intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp_files(path.parent)
    # A unique name in the same directory (os.replace cannot cross filesystems); opened with
    # "x" rather than mkstemp so the file gets the usual umask permissions, not 0600.
    tmp = _tmp_path(path)
    writer: _Writer | None = None
    try:
        with open(tmp, "xb") as f:
            writer = _Writer(f)
            # a dict (an OrderedDict state_dict keeps its _metadata) as it is; a Mapping as a dict
            is_plain = isinstance(obj, dict) or not isinstance(obj, Mapping)
            torch.save(obj if is_plain else dict(obj), writer)
            writer.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows, same filesystem
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        cause = writer.error if writer is not None and writer.error is not None else error
        full = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or (isinstance(cause, OSError) and cause is not error):
            # torch reports a failed write as a RuntimeError ("unexpected pos"): the OSError
            # under it, with its errno, is what the caller can act on
            kept = "the previous file there is intact" if path.exists() else "nothing was written"
            what, fix = (
                ("no space left on the device writing", "Free some space (or save elsewhere)")
                if full
                else ("could not write", "Fix the cause (or save elsewhere)")
            )
            raise OSError(
                cause.errno, f"{what} {path} ({cause.strerror}); {kept}. {fix} and save again."
            ) from error
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
        raise CheckpointError(f"{path} does not hold a checkpoint dict; got {type(obj).__name__}.")
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
