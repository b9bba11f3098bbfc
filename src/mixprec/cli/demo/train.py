"""`mixprec train`: the digits CNN in fp32, fp16 and bf16 from one seed, side by side, trained
by a `Learner` (`to_fp16()` for the half precisions).

Under torchrun (``torchrun --nproc_per_node=2 -m mixprec train``) every process trains its
share of each batch (`--batch-size` per process) and rank 0 prints the table."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

from mixprec.cli.demo.data import digits_cnn, digits_tensors
from mixprec.cli.options import (
    add_threads,
    comma_list,
    loss_scale,
    non_negative_int,
    pin_threads,
    plot_path,
    positive_float,
    positive_int,
    report_file,
)
from mixprec.core.modes import MODES
from mixprec.learner.callback import Callback
from mixprec.learner.data import DataBunch
from mixprec.learner.learner import Learner
from mixprec.learner.metrics import accuracy
from mixprec.learner.recorder import Recorder, plot_runs
from mixprec.parallel.distributed import cleanup_distributed, init_distributed, is_data_parallel

__all__ = ["PRECISIONS", "RunResult", "TrainConfig", "format_table", "train_digits"]

PRECISIONS: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


@dataclass
class TrainConfig:
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    loss_scale: float | str = "dynamic"
    growth_interval: int = 50  # short, so 8 epochs (184 steps) show the scale move
    flat_master: bool = True  # mode "master" only
    mode: str = "master"  # or "autocast": fp32 model under torch.autocast


@dataclass
class RunResult:
    precision: str
    accuracy: float
    seconds: float
    skipped_steps: int
    loss_scale: float | None
    final_loss: float
    mode: str = "master"


def train_digits(
    precision: str, config: TrainConfig, progress: bool = False, callbacks: Sequence[Callback] = ()
) -> tuple[RunResult, Recorder]:
    """Train the digits CNN in `precision` (in `config.mode`) with a Learner and `callbacks`;
    return its figures and history."""
    dtype = PRECISIONS[precision]
    x_train, y_train, x_valid, y_valid = digits_tensors(config.seed)
    torch.manual_seed(config.seed)
    shuffle = torch.Generator().manual_seed(config.seed)
    data = DataBunch(
        DataLoader(
            TensorDataset(x_train, y_train),
            batch_size=config.batch_size,
            shuffle=True,
            generator=shuffle,
        ),
        DataLoader(TensorDataset(x_valid, y_valid), batch_size=512),
    )
    learn = Learner(data, digits_cnn(), metrics=[accuracy], callbacks=callbacks, progress=progress)
    if dtype != torch.float32:
        learn.to_fp16(
            config.loss_scale,
            flat_master=config.flat_master and config.mode == "master",
            dtype=dtype,
            growth_interval=config.growth_interval,
            mode=config.mode,
        )
    start = time.perf_counter()
    learn.fit(config.epochs, config.lr)
    seconds = time.perf_counter() - start
    _, valid_accuracy = learn.validate()
    result = RunResult(
        precision=precision,
        accuracy=round(valid_accuracy, 4),
        seconds=round(seconds, 3),
        skipped_steps=learn.recorder.skipped_steps,
        loss_scale=getattr(learn.opt, "loss_scale", None),
        final_loss=round(learn.recorder.losses[-1], 5),
        mode=config.mode if dtype != torch.float32 else "-",
    )
    return result, learn.recorder


def _header() -> list[str]:
    header = (
        f"{'precision':<10}{'accuracy':>10}{'seconds':>10}{'skipped':>9}{'loss scale':>12}"
        f"{'mode':>10}"
    )
    return [header, "-" * len(header)]


def _row(r: RunResult) -> str:
    scale = "-" if r.loss_scale is None else f"{r.loss_scale:g}"
    return (
        f"{r.precision:<10}{r.accuracy:>10.4f}{r.seconds:>10.2f}{r.skipped_steps:>9}{scale:>12}"
        f"{r.mode:>10}"
    )


def format_table(results: list[RunResult]) -> str:
    """The runs as a fixed-width table."""
    return "\n".join([*_header(), *map(_row, results)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--epochs", type=positive_int, default=defaults.epochs, help="epochs")
    parser.add_argument(
        "--batch-size", type=positive_int, default=defaults.batch_size, help="images per step"
    )
    parser.add_argument("--lr", type=positive_float, default=defaults.lr, help="learning rate")
    parser.add_argument("--seed", type=non_negative_int, default=defaults.seed, help="seed")
    parser.add_argument(
        "--loss-scale",
        type=loss_scale,
        default=defaults.loss_scale,
        help="half precisions: 'dynamic' or a positive number (static)",
    )
    parser.add_argument(
        "--growth-interval",
        type=positive_int,
        default=defaults.growth_interval,
        help="clean steps before a dynamic loss scale doubles",
    )
    parser.add_argument(
        "--precisions",
        type=comma_list(list(PRECISIONS)),
        default="fp32,fp16,bf16",
        help=f"comma-separated, from {', '.join(PRECISIONS)}",
    )
    add_threads(parser)
    parser.add_argument(
        "--mode",
        default=defaults.mode,
        choices=list(MODES),
        help="half precisions: a half model with fp32 masters, or an fp32 model under autocast",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--plot",
        type=plot_path,
        metavar="PATH.png",
        help="write a PNG of the loss and loss scale per step here",
    )


def run(args: argparse.Namespace) -> int:
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        loss_scale=args.loss_scale,
        growth_interval=args.growth_interval,
        mode=args.mode,
    )
    pin_threads(args.threads)
    owns_group = not (dist.is_available() and dist.is_initialized())
    init_distributed()  # under torchrun: join its process group (gloo on CPU, NCCL on GPU)
    try:
        processes = dist.get_world_size() if is_data_parallel() else 1
        main_rank = processes == 1 or dist.get_rank() == 0
        table = main_rank and not args.json
        if table:
            if processes > 1:
                print(
                    f"data-parallel: {processes} processes ({dist.get_backend()}), batch "
                    f"{config.batch_size} per process, {config.batch_size * processes} per step"
                )
            _print_lines(_header())
        runs = {}
        for p in args.precisions:  # each row as its run ends: a pipe or a log sees it then
            runs[p] = train_digits(p, config, progress=not args.json)
            if table:
                _print_lines([_row(runs[p][0])])
        if main_rank:
            _report(args, config, runs, processes)
    finally:
        if owns_group:
            cleanup_distributed()
    return 0


def _print_lines(lines: list[str]) -> None:
    """Print and flush: stdout to a pipe or a file is block-buffered."""
    print("\n".join(lines), flush=True)


def _report(
    args: argparse.Namespace,
    config: TrainConfig,
    runs: dict[str, tuple[RunResult, Recorder]],
    processes: int,
) -> None:
    """Print the JSON (the table was printed run by run), then write the plot: on rank 0
    only, under torchrun."""
    if args.json:
        results = [asdict(result) for result, _ in runs.values()]
        print(json.dumps({"processes": processes, "runs": results}))
    if args.plot:
        title = f"digits CNN, {config.epochs} epochs, loss scale {config.loss_scale}"
        if config.loss_scale == "dynamic":
            title += f" (growth interval {config.growth_interval})"
        path = plot_runs({p: recorder for p, (_, recorder) in runs.items()}, args.plot, title=title)
        report_file("plot", path, args.json)
