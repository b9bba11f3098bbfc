"""`Ranks`: what a `Learner` does on each of the processes torchrun starts (data parallel).

Launched as ``torchrun --nproc_per_node=2 train.py``, a Learner joins the process group
torchrun describes and, on every rank: gives the training loader a `DistributedSampler`
(reshuffled per epoch by `set_epoch`) and the validation loader a shard of its own, starts
from rank 0's weights, trains through `DistributedDataParallel` (which all-reduces the half
gradients), records the loss averaged over ranks, reduces the validation sums, and lets
rank 0 write checkpoints that every rank can load. In one process `Ranks` is off and every
method is a pass-through, so the same script runs under plain ``python``.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)

from mixprec.core.checkpoint import save_checkpoint
from mixprec.engine.optimizer import MixedPrecisionOptimizer
from mixprec.learner.data import DataBunch, loader_length
from mixprec.parallel.distributed import (
    broadcast_from_rank0_,
    collective_timeout,
    gather_ints,
    init_distributed,
    is_data_parallel,
    rendezvous,
    save_on_rank0,
    wrap_ddp,
)

__all__ = ["Ranks", "distributed_loader", "set_epoch", "shard_loader"]

_SEED_RANGE = 2**63  # DistributedSampler seeds a generator with seed + epoch: keep it in range


class Ranks:
    """This process's rank among the data-parallel processes, and the Learner's steps that
    depend on it; rank 0 of 1, every step a pass-through, in a single process.

    `Ranks()` joins the process group torchrun's environment describes (`init_distributed`:
    gloo on CPU, NCCL on GPU) and is on when the default group, torchrun's or one the caller
    initialized, has more than one process. `Ranks(enabled=False)` stays off: the Learner then
    trains alone in this process. `ddp_kwargs` go to `DistributedDataParallel` (e.g.
    `find_unused_parameters=True`); set them before `fit`.
    """

    def __init__(self, enabled: bool = True, **ddp_kwargs: Any) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"distributed must be True or False; got {enabled!r}.")
        if enabled:
            init_distributed()
        self.enabled = enabled and is_data_parallel()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world_size = dist.get_world_size() if self.enabled else 1
        self.ddp_kwargs = ddp_kwargs
        self.timeout = collective_timeout()  # at validate, save and fit start: see `meet`
        self.ddp: DistributedDataParallel | None = None  # during fit(), the wrapped model
        self.device = torch.device("cpu")  # the data's, from setup_()

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that shows progress and writes checkpoints."""
        return self.rank == 0

    def setup_(self, data: DataBunch, model: nn.Module) -> None:
        """Shard `data`'s loaders over the ranks (in place) and give every rank rank 0's
        parameters and buffers."""
        self.device = data.device
        if not self.enabled:
            return
        if isinstance(model, DistributedDataParallel):
            raise TypeError(
                "the model is already wrapped in DistributedDataParallel; pass the plain "
                "module: the Learner wraps it for training itself (learn.ranks.ddp_kwargs "
                "holds DDP's options)."
            )
        train = data.train_dl.dl
        generator = getattr(train, "generator", None) or getattr(
            getattr(train, "sampler", None), "generator", None
        )
        seed = self._shared_seed(generator)
        data.train_dl.dl = distributed_loader(train, self.rank, self.world_size, seed)
        if data.valid_dl is not None:
            data.valid_dl.dl = shard_loader(data.valid_dl.dl, self.rank, self.world_size)
        self.broadcast_([*model.parameters(), *model.buffers()])

    def meet(self, what: str) -> None:
        """Every rank reaches the collective `what` within `self.timeout`, or a clear error
        naming it and the ranks, instead of a silent hang (`rendezvous`)."""
        if self.enabled:
            rendezvous(what, self.timeout)

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's values: one broadcast per dtype and device."""
        if self.enabled:
            broadcast_from_rank0_(tensors)

    @contextmanager
    def training(self, model: nn.Module, opt: torch.optim.Optimizer | None) -> Iterator[None]:
        """Within: `model` wrapped in DDP, as `self.ddp` (see `train_module`).

        Wrapped anew for each fit, after the callbacks' `on_train_begin` (the model is in its
        training dtype, frozen parameters are set), so DDP buckets what this fit trains. The
        fp32 masters are first overwritten with rank 0's, so every rank steps the same weights
        whatever each rank's masters were built from."""
        if not self.enabled:
            yield
            return
        self.meet("learn.fit()")
        if isinstance(opt, MixedPrecisionOptimizer):
            self.broadcast_(opt.master_tensors())
        self.ddp = wrap_ddp(model, **self.ddp_kwargs)
        try:
            yield
        finally:
            self.ddp = None
            # DDP sits in a reference cycle: free its reducer (autograd hooks, buckets) now.
            # One left for the interpreter's exit can abort the process after
            # destroy_process_group ("terminate called without an active exception").
            gc.collect()

    def train_module(self, model: nn.Module) -> nn.Module:
        """The module the training forward runs through: DDP during fit, else `model`."""
        return model if self.ddp is None else self.ddp

    def batches(self, dl: Any, epoch: int) -> Any:
        """The training batches of `dl` for `epoch`. Under torchrun, from a loader that may
        give the ranks different numbers of batches (any but one with a DistributedSampler:
        an IterableDataset shards itself), every rank says at each batch whether it has one
        (one small all-gather and host sync per batch), so that uneven shards are a clear
        error on every rank at once rather than a rank waiting forever in DDP's all-reduce."""
        loader = getattr(dl, "dl", dl)
        if not self.enabled or isinstance(getattr(loader, "sampler", None), DistributedSampler):
            return dl
        return _EvenBatches(dl, self, epoch)

    def check_batch_(self, has_batch: bool, index: int, epoch: int) -> None:
        """Raise on every rank if some ranks have training batch `index` of `epoch` and
        others do not (see `batches`)."""
        flags = gather_ints(int(has_batch), f"training batch {index + 1}", self.timeout)
        if len(set(flags)) > 1:
            have = [r for r, f in enumerate(flags) if f]
            done = [r for r, f in enumerate(flags) if not f]
            raise RuntimeError(
                f"rank {self.rank} of {self.world_size}: the ranks' training loaders give "
                f"different numbers of batches in epoch {epoch + 1}: rank(s) {have} have "
                f"batch {index + 1}, rank(s) {done} have {index}. Every rank must take the "
                "same number of steps (DDP all-reduces each step's gradients over all of "
                "them): make each rank's IterableDataset shard give the same number of "
                "batches (e.g. drop the remainder), or use a map-style dataset, which the "
                "Learner shards evenly with a DistributedSampler."
            )

    def end_epoch_(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (BatchNorm statistics), as DDP's next forward
        would, so every rank validates and holds the same model."""
        self.broadcast_(model.buffers())

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """`value` averaged over the ranks (a new tensor); `value` itself in one process."""
        if not self.enabled:
            return value
        total = value.detach().clone()
        dist.all_reduce(total)
        return total / self.world_size

    def sum_totals(
        self, totals: torch.Tensor | None, count: int, size: int
    ) -> tuple[torch.Tensor | None, int]:
        """Validation sums (`size` values, None on a rank with no samples) and the sample
        count, summed over the ranks in fp64; (None, 0) if no rank had a sample."""
        if not self.enabled:
            return totals, count
        self.meet("learn.validate()")
        sums = torch.zeros(size + 1, dtype=torch.float64, device=self.device)
        if totals is not None:
            sums[:size] = totals
        sums[size] = count
        dist.all_reduce(sums)
        count = int(sums[size].item())
        return (sums[:size] if count else None), count

    def save(self, checkpoint: Mapping[str, Any], path: str | os.PathLike) -> Path:
        """Write `checkpoint` atomically on rank 0, with every rank's random state
        (`"rng_ranks"`, from `checkpoint["rng"]`); every rank returns once the file is there,
        or raises if rank 0 could not write it."""
        if not self.enabled:
            return save_checkpoint(checkpoint, path)
        self.meet("learn.save()")
        ranks: list[Any] = [None] * self.world_size
        dist.all_gather_object(ranks, checkpoint.get("rng"))
        return save_on_rank0({**checkpoint, "rng_ranks": ranks}, path)

    def own_rng(self, checkpoint: Mapping[str, Any]) -> Any:
        """The random state this rank restores from `checkpoint`: its own if the checkpoint was
        written by as many ranks, else rank 0's (None if it holds none)."""
        per_rank = checkpoint.get("rng_ranks")
        if isinstance(per_rank, list) and len(per_rank) == self.world_size:
            return per_rank[self.rank]
        return checkpoint.get("rng")

    def _shared_seed(self, generator: torch.Generator | None) -> int:
        """The shuffling seed, rank 0's: the loader's generator's seed, else torch's."""
        seed = generator.initial_seed() if generator is not None else torch.initial_seed()
        shared = [seed % _SEED_RANGE]
        dist.broadcast_object_list(shared, src=0)
        return int(shared[0])

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size}, enabled={self.enabled})"


class _EvenBatches:
    """A training loader's batches, each checked to exist on every rank (`Ranks.batches`)."""

    def __init__(self, dl: Any, ranks: Ranks, epoch: int) -> None:
        self.dl, self.ranks, self.epoch = dl, ranks, epoch

    def __len__(self) -> int:
        length = loader_length(self.dl)
        if length is None:
            raise TypeError("the training loader has no len()")
        return length

    def __iter__(self) -> Iterator[Any]:
        index = 0
        for batch in self.dl:
            self.ranks.check_batch_(True, index, self.epoch)
            yield batch
            index += 1
        self.ranks.check_batch_(False, index, self.epoch)


def set_epoch(loader: Any, epoch: int) -> None:
    """Tell `loader`'s sampler (a DistributedSampler, or any with `set_epoch`) the epoch, so
    it shuffles differently each epoch and the same way again when training resumes."""
    sampler = getattr(loader, "sampler", None)
    if callable(getattr(sampler, "set_epoch", None)):
        sampler.set_epoch(epoch)


def distributed_loader(dl: Any, rank: int, world_size: int, seed: int = 0) -> Any:
    """`dl` with a `DistributedSampler`: this rank's share of each epoch, every rank the same
    number of batches (the last share padded with repeated samples), shuffled if `dl` was.

    `dl` must be a torch DataLoader with a default sampler (shuffled or not); one that
    already has a DistributedSampler, or an IterableDataset (which must shard itself and give
    every rank the same number of batches), is returned as it is.
    """
    if isinstance(dl, DataLoader) and (
        isinstance(dl.sampler, DistributedSampler) or isinstance(dl.dataset, IterableDataset)
    ):
        return dl
    sampler = _default_sampler(dl)
    if sampler is None or (
        isinstance(sampler, RandomSampler)
        and (sampler.replacement or sampler._num_samples is not None)
    ):
        raise TypeError(
            "under torchrun the training loader must be a torch DataLoader built with "
            "shuffle=True or False and no custom sampler, so the Learner can give it a "
            f"DistributedSampler; got {_describe(dl)}. Or build it yourself with "
            "sampler=DistributedSampler(dataset) (the Learner calls its set_epoch)."
        )
    shuffle = isinstance(sampler, RandomSampler)
    return _rebuild(
        dl, DistributedSampler(dl.dataset, world_size, rank, shuffle=shuffle, seed=seed)
    )


def shard_loader(dl: Any, rank: int, world_size: int) -> Any:
    """`dl` over this rank's shard of its samples (every `world_size`-th, from `rank`; none
    repeated), for validation sums that are then added over the ranks. A loader that cannot
    be sharded so is returned as it is: every rank then evaluates all of it, which gives the
    same averages for `world_size` times the work."""
    if _default_sampler(dl) is None:
        return dl
    return _rebuild(dl, range(rank, len(dl.dataset), world_size))


def _default_sampler(dl: Any) -> torch.utils.data.Sampler | None:
    """The sampler of a plain DataLoader over a map-style dataset with the default (or no)
    batching; None for anything else."""
    if type(dl) is not DataLoader or isinstance(dl.dataset, IterableDataset):
        return None
    if dl.batch_sampler is not None and type(dl.batch_sampler) is not BatchSampler:
        return None
    sampler = dl.sampler
    return sampler if type(sampler) in (RandomSampler, SequentialSampler) else None


def _rebuild(dl: DataLoader, sampler: Iterable[int]) -> DataLoader:
    """A DataLoader like `dl` (batching, workers, collation, pinning, generator) over `sampler`."""
    options: dict[str, Any] = {
        "batch_size": dl.batch_size,
        "num_workers": dl.num_workers,
        "collate_fn": dl.collate_fn,
        "pin_memory": dl.pin_memory,
        "drop_last": dl.drop_last,
        "timeout": dl.timeout,
        "worker_init_fn": dl.worker_init_fn,
        "multiprocessing_context": dl.multiprocessing_context,
        "generator": dl.generator,
    }
    if dl.num_workers > 0:
        options["prefetch_factor"] = dl.prefetch_factor
        options["persistent_workers"] = dl.persistent_workers
    for name in ("pin_memory_device", "in_order"):  # newer torch versions only
        if hasattr(dl, name):
            options[name] = getattr(dl, name)
    return DataLoader(dl.dataset, sampler=sampler, **options)


def _describe(dl: Any) -> str:
    if not isinstance(dl, DataLoader):
        return f"a {type(dl).__name__}"
    batch_sampler = "" if dl.batch_sampler is None else f", {type(dl.batch_sampler).__name__}"
    return f"a {type(dl).__name__} with a {type(dl.sampler).__name__}{batch_sampler}"
