"""Run `mixprec bench optimizer` from a checkout: `python benchmarks/optimizer.py --help`."""

import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mixprec").is_dir():  # this checkout's code, installed or not
    sys.path.insert(0, str(SRC))

from mixprec.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main("optimizer"))
