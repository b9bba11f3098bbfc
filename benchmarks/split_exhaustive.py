"""Check split fp32 masters on every one of the 2**32 fp32 bit patterns (tens of minutes).

For each pattern: the high part is torch's RNE of the master, the reconstruction is exact
except for the upper tie of an even high part (stored one pattern below, still rounding to
the same high part) and nan (which stays nan). Prints the number of such ties.
Run from a checkout: `python benchmarks/split_exhaustive.py`.
"""

import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mixprec").is_dir():
    sys.path.insert(0, str(SRC))

from mixprec.core.split import join_, split_  # noqa: E402


def main(n: int = 1 << 24) -> int:
    torch.set_num_threads(1)
    ties, start_time = 0, time.time()
    hi = torch.empty(n, dtype=torch.bfloat16)
    lo = torch.empty(n, dtype=torch.int16)
    back = torch.empty(n)
    for start in range(-(1 << 31), 1 << 31, n):
        bits = torch.arange(start, start + n, dtype=torch.int64).to(torch.int32)
        m = bits.view(torch.float32)
        split_(m, hi, lo)
        join_(back, hi, lo)
        nan = torch.isnan(m)
        assert torch.equal(hi.view(torch.int16), m.bfloat16().view(torch.int16))
        assert bool(torch.isnan(back[nan]).all())
        diff = (back.view(torch.int32) != bits) & ~nan
        if diff.any():  # each: the upper tie of an even high part, stored one pattern below
            hb = hi.view(torch.int16)[diff].to(torch.int64)
            b = bits[diff].to(torch.int64)
            d = (b - hb * 65536 + (1 << 31)) % (1 << 32) - (1 << 31)
            assert bool((d == 32768).all()) and bool((hb % 2 == 0).all()), start
            assert torch.equal(back.view(torch.int32)[diff].to(torch.int64), b - 1)
            ties += int(diff.sum())
        ok = ~nan
        assert torch.equal(back[ok].bfloat16().view(torch.int16), hi[ok].view(torch.int16))
    seconds = round(time.time() - start_time)
    print(f"all 2**32 patterns ok; one-ulp ties: {ties}; {seconds} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
