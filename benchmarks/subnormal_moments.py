"""How subnormal Adam moments slow a CPU optimizer step, and what flushing them does.

    python benchmarks/subnormal_moments.py [--steps 12] [--init torch|gpt2] [--tiny]

Trains `mixprec bench step`'s GPT (bf16, mixprec's default `MixedPrecisionOptimizer(AdamW)`,
one thread) and prints, per step, the optimizer step's time (thread CPU time) and how many
of the tied token embedding's first moments are subnormal, once as torch leaves floats and
once under `torch.set_flush_denormal(True)`. `--init torch` (the default here) is torch's
default initialization of every layer, an N(0, 1) embedding tied to the head, as the bench
GPT had before it was initialized as GPT-2 is (`--init gpt2`): its softmax underflows, and
the moments decay into subnormals.
"""

import argparse
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
if (SRC / "mixprec").is_dir():  # this checkout's code, installed or not
    sys.path.insert(0, str(SRC))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from mixprec import MixedPrecisionOptimizer, model_to_half  # noqa: E402
from mixprec.cli.bench.step_models import family  # noqa: E402


def run(steps: int, init: str, flush: bool, tiny: bool) -> list[tuple[float, int]]:
    """(step ms, subnormal first moments of the token embedding) for each step."""
    fam = family("gpt", tiny)
    torch.manual_seed(0)
    model = fam.make()
    if init == "torch":  # torch's defaults, the embeddings last: the tied weight is N(0, 1)
        for kind in (nn.Linear, nn.LayerNorm, nn.Embedding):
            for module in model.modules():
                if isinstance(module, kind):
                    module.reset_parameters()
    model_to_half(model, torch.bfloat16)
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-4))
    tok = next(m for m in opt.master_params[0] if m.shape == model.tok.weight.shape)
    tiny_normal = torch.finfo(torch.float32).tiny
    torch.set_flush_denormal(flush)
    rows = []
    try:
        for _ in range(steps):
            opt.backward(fam.loss(model(fam.inputs), fam.targets))
            start = time.thread_time()
            opt.step()
            ms = (time.thread_time() - start) * 1e3
            opt.zero_grad()
            m = opt.optimizer.state[tok]["exp_avg"]
            rows.append((ms, int(((m != 0) & (m.abs() < tiny_normal)).sum())))
    finally:
        torch.set_flush_denormal(False)  # torch's default
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--init", choices=["torch", "gpt2"], default="torch")
    parser.add_argument("--tiny", action="store_true", help="the tiny GPT: a quick smoke run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {flush: run(args.steps, args.init, flush, args.tiny) for flush in (False, True)}
    print(f"gpt ({args.init} init), optimizer step ms and subnormal first moments of the "
          "token embedding, per step")  # fmt: skip
    print(f"{'step':>4}  {'ms':>8}  {'subnormal':>9}  {'ms, flushed':>11}  {'subnormal':>9}")
    for i, ((ms, sub), (ms_f, sub_f)) in enumerate(zip(runs[False], runs[True]), 1):
        print(f"{i:>4}  {ms:>8.2f}  {sub:>9,}  {ms_f:>11.2f}  {sub_f:>9,}")


if __name__ == "__main__":
    main()
