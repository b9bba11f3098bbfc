"""Where one CPU optimizer step of mixprec's default (or split) layout spends its time.

    python benchmarks/step_parts.py [--layers 8 64] [--case mixprec|mixprec_split]

For `mixprec bench optimizer`'s models (N 1024x1024 bf16 layers, AdamW, one thread), each
round steps torch's fused AdamW and then mixprec, as that benchmark does (so both start
with caches the other just filled), and times with the thread's CPU clock the parts of
mixprec's step between its two native calls: the Python before the overflow check, the
check, the Python between, the Adam(W) kernel, the Python after. The last column is the
same step with both native calls replaced by no-ops (after the first steps, so the plan and
the agreement probe are made): the Python alone, with warm caches. Medians of `--repeats`.
Needs the native kernels (a C compiler).
"""

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mixprec").is_dir():  # this checkout's code, installed or not
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402

from mixprec.cli.bench import optimizer  # noqa: E402
from mixprec.core import native  # noqa: E402

CALLS = ("mixprec_nonfinite", "mixprec_nonfinite_pieces", "mixprec_adam")  # one check runs
PARTS = ("Python before", "check", "Python between", "Adam(W) kernel", "Python after")


def _timed(lib, marks: list[float]) -> None:
    for name in CALLS:
        fn = getattr(lib, name)

        def call(*args, fn=fn):
            marks.append(time.thread_time())
            result = fn(*args)
            marks.append(time.thread_time())
            return result

        setattr(lib, name, call)


def measure(layers: int, case: str, repeats: int) -> dict[str, float]:
    """Median ms of each part of `case`'s step (see the module docstring)."""
    lib = native.library()
    if lib is None:
        sys.exit(f"no native kernels: {native.unavailable_reason()}")
    real = {name: getattr(lib, name) for name in CALLS}
    cases = optimizer._cases(layers, torch.device("cpu"))
    (torch_setup, torch_step), (setup, step) = cases["torch_fused"], cases[case]
    for _ in range(3):
        setup()
        step()
    marks: list[float] = []
    parts: list[list[float]] = []
    _timed(lib, marks)
    try:
        for _ in range(repeats):
            torch_setup()
            torch_step()
            setup()
            marks.clear()
            start = time.thread_time()
            step()
            points = [start, *marks, time.thread_time()]
            parts.append([(b - a) * 1e3 for a, b in itertools.pairwise(points)])
        for name in CALLS:
            setattr(lib, name, lambda *args: 0)
        python = []
        for _ in range(repeats):
            setup()
            start = time.thread_time()
            step()
            python.append((time.thread_time() - start) * 1e3)
    finally:
        for name, fn in real.items():
            setattr(lib, name, fn)
    result = {name: statistics.median(p[i] for p in parts) for i, name in enumerate(PARTS)}
    result["Python alone, warm"] = statistics.median(python)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--case", default="mixprec", choices=["mixprec", "mixprec_split"])
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ms per part, {args.case}, thread CPU time, medians of {args.repeats}")
    print(f"{'params':>11}  " + "  ".join(f"{p:>14}" for p in (*PARTS, "Python alone, warm")))
    for layers in args.layers:
        row = measure(layers, args.case, args.repeats)
        print(f"{layers * 2**20:>11,}  " + "  ".join(f"{v:>14.3f}" for v in row.values()))


if __name__ == "__main__":
    main()
