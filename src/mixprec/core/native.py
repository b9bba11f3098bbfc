"""mixprec's CPU kernels (native_kernels.c), compiled at first use and loaded with ctypes.

Torch has no kernel that steps fp32 masters from half gradients and writes the half weights
in one pass, so mixprec carries one for the CPU: `native_kernels.c`, built once per machine
(`cc -O3 -march=native -ffp-contract=off`) into `~/.cache/mixprec` (or `$MIXPREC_CACHE_DIR`),
keyed by the source, the compiler and the CPU. Without a C compiler, or with
`MIXPREC_NATIVE=0`, `library()` is None and mixprec runs torch's kernels instead: the same
numbers, more passes. `unavailable_reason()` says why.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import torch

__all__ = [
    "CHECK_DTYPES",
    "KINDS",
    "AdamArgs",
    "AdamPiece",
    "StepCounters",
    "any_nonfinite",
    "cpu_scalar",
    "cpu_scalar_view",
    "library",
    "run_split",
    "unavailable_reason",
]

FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-shared", "-fPIC")
"""No -ffast-math and no contraction: every rounding is the one the source writes."""

_P = ctypes.c_void_p


class AdamArgs(ctypes.Structure):
    """The per-step constants of one Adam(W) param group (see native_kernels.c)."""

    _fields_ = [
        *((name, ctypes.c_float) for name in (
            "c1", "b2", "c2", "bc2s", "eps", "neg_step", "c7", "wd", "scale", "sign"
        )),
        *((name, ctypes.c_int32) for name in ("l2", "amsgrad", "has_scale", "zero_grad")),
        ("mxcsr", ctypes.c_uint32),
    ]  # fmt: skip


class AdamPiece(ctypes.Structure):
    """One tensor's share of a step (see native_kernels.c): `master` is the fp32 master (split
    masters: the bf16 weight), `half` the half weight (split masters: the int16 low bits),
    `args` the index of its `AdamArgs` in the call."""

    _fields_ = [
        *((name, _P) for name in ("master", "grad", "m", "v", "mx", "half")),
        ("n", ctypes.c_int64),
        ("kind", ctypes.c_int32),
        ("args", ctypes.c_int32),
    ]


KINDS = {"bf16": 0, "f16": 1, "split": 2, "f32": 3}
"""`AdamPiece.kind` of each kernel."""

_I64 = ctypes.c_int64
_SIGNATURES: dict[str, tuple[list, type | None]] = {
    "mixprec_adam": ([ctypes.POINTER(AdamPiece), _I64, ctypes.POINTER(AdamArgs), _I64, _I64], None),
    "mixprec_split": ([_P, _P, _P, _I64], None),
    "mixprec_nonfinite": ([_P, _P, _P, _I64], ctypes.c_int32),
    "mixprec_nonfinite_pieces": ([ctypes.POINTER(AdamPiece), _I64], ctypes.c_int32),
    "mixprec_count_steps": ([_P, _I64], None),
    "mixprec_mxcsr": ([], ctypes.c_uint32),
}

_reason: list[str] = []  # why library() is None, once it has been asked


def unavailable_reason() -> str | None:
    """Why the native kernels are not in use (None: they are, or were not needed yet)."""
    return _reason[0] if _reason else None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc", "gcc", "clang"):
        path = shutil.which(name.split()[0]) if name else None
        if path:
            return path
    return None


def _cpu_signature() -> str:
    try:  # -march=native: the build is only good for this kind of CPU
        text = Path("/proc/cpuinfo").read_text()
        return next(line for line in text.splitlines() if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _build(source: bytes, compiler: str, target: Path) -> None:
    """Compile `source` into `target`, atomically (other processes may race to build it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        c_file = Path(tmp) / "native_kernels.c"
        c_file.write_bytes(source)
        out = Path(tmp) / target.name
        done = subprocess.run(
            [compiler, *FLAGS, "-o", str(out), str(c_file)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-400:]}")
        os.replace(out, target)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built first if this machine has none yet; None if they cannot be
    (no C compiler, a failed build, `MIXPREC_NATIVE=0`): see `unavailable_reason()`."""
    if os.environ.get("MIXPREC_NATIVE", "1") == "0":
        _reason[:] = ["turned off by MIXPREC_NATIVE=0"]
        return None
    compiler = _compiler()
    if compiler is None:
        _reason[:] = ["no C compiler found (set CC to one)"]
        return None
    source = resources.files("mixprec.core").joinpath("native_kernels.c").read_bytes()
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30
        ).stdout
        key = hashlib.sha256(
            b"\0".join(
                s.encode() if isinstance(s, str) else s
                for s in (source, compiler, version, " ".join(FLAGS), _cpu_signature())
            )
        ).hexdigest()[:20]
        cache = Path(os.environ.get("MIXPREC_CACHE_DIR") or Path.home() / ".cache" / "mixprec")
        target = cache / f"native-{key}{sysconfig.get_config_var('SHLIB_SUFFIX') or '.so'}"
        if not target.exists():
            _build(source, compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _reason[:] = [f"the build failed: {error}"]
        return None
    for name, (argtypes, restype) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _reason[:] = []
    return lib


def _cpu_scalar(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.numel() == 1


def cpu_scalar_view(t: torch.Tensor) -> ctypes.c_float:
    """The memory of a one-element fp32 CPU tensor as a `ctypes.c_float`, whose `value` reads
    it without a dispatched op (what a device sync would be on a GPU is a load here); valid
    while `t` lives."""
    if not _cpu_scalar(t):
        raise ValueError(f"expected a one-element fp32 CPU tensor; got {t.dtype} {t.device}")
    return ctypes.c_float.from_address(t.data_ptr())


def cpu_scalar(t: torch.Tensor) -> float:
    """The value of a one-element fp32 CPU tensor (see `cpu_scalar_view`)."""
    return cpu_scalar_view(t).value


class StepCounters:
    """fp32 CPU step counters (Adam's `state["step"]`), advanced by one in one call, as
    torch's `_foreach_add_(steps, 1)` would (which dispatches an op per counter)."""

    def __init__(self, steps: Sequence[torch.Tensor]) -> None:
        lib = library()
        if lib is None:
            raise RuntimeError(f"no native kernels: {unavailable_reason()}")
        for t in steps:
            cpu_scalar_view(t)  # validates: one fp32 CPU value
        self._steps = list(steps)  # kept alive: the pointers below are into them
        self._pointers = (ctypes.c_void_p * len(steps))(*(t.data_ptr() for t in steps))
        self._advance = lib.mixprec_count_steps

    @staticmethod
    def possible(steps: Sequence[torch.Tensor]) -> bool:
        """Whether `steps` can be counted natively: the kernels are here, every counter is
        one fp32 value on the CPU."""
        return library() is not None and all(_cpu_scalar(t) for t in steps)

    def advance(self) -> None:
        """Add one to every counter."""
        self._advance(self._pointers, len(self._steps))


_EXPONENT = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00, torch.float32: 0x7F800000}
CHECK_DTYPES = tuple(_EXPONENT)


def any_nonfinite(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of the contiguous CPU `tensors` (bf16, fp16 or fp32) holds an inf or nan:
    one read of each, exact (an all-ones exponent), in one call. Needs `library()`."""
    lib = library()
    assert lib is not None
    count = len(tensors)
    pointers = (ctypes.c_void_p * count)(*(t.data_ptr() for t in tensors))
    sizes = (ctypes.c_int64 * count)(*(t.numel() for t in tensors))
    exponents = (ctypes.c_uint32 * count)(*(_EXPONENT[t.dtype] for t in tensors))
    return bool(lib.mixprec_nonfinite(pointers, sizes, exponents, count))


PARALLEL_MIN = 1 << 16
"""Elements of one call below which a kernel runs in the calling thread only."""

_pools: dict[int, ThreadPoolExecutor] = {}


def run_split(fn: Callable[[int, int], None], n: int) -> None:
    """`fn(start, stop)` over `[0, n)`, split into `torch.get_num_threads()` ranges (multiples
    of 64 elements) run side by side when `n` is large; ctypes lets go of the GIL while a
    kernel runs."""
    threads = torch.get_num_threads()
    if threads <= 1 or n < PARALLEL_MIN:
        fn(0, n)
        return
    pool = _pools.get(threads)
    if pool is None:
        pool = _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="mixprec")
    per_thread = -(-n // threads)
    step = -(-per_thread // 64) * 64  # rounded up to a multiple of 64
    for future in [pool.submit(fn, a, min(a + step, n)) for a in range(0, n, step)]:
        future.result()
