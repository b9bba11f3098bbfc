"""Data-parallel mixed precision on torch.distributed: torchrun's environment, DDP, no_sync.

The loop, launched with ``torchrun --nproc_per_node=2 train.py``::

    env = init_distributed()                       # RANK, WORLD_SIZE, ... as torchrun set them
    model = wrap_ddp(model_to_half(make_model()))  # DDP all-reduces the half grads
    opt = MixedPrecisionOptimizer(torch.optim.AdamW(model.parameters()), "dynamic")
    for micro_batches in loader:                   # one list of micro-batches per step
        for x, y in accumulate(model, micro_batches):   # no_sync() for all but the last
            opt.backward(loss_fn(model(x.half()).float(), y) / len(micro_batches))
        opt.step()                                 # every rank steps or skips together
        opt.zero_grad()
    cleanup_distributed()

Build the optimizer after `wrap_ddp`: DDP copies rank 0's weights into every rank when it
wraps the model, and the fp32 masters must be made from those. In a single process every
helper here is a pass-through, so the same script runs with plain ``python``.
"""

from __future__ import annotations

import gc
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mixprec.core.checkpoint import save_checkpoint

__all__ = [
    "broadcast_from_rank0_",
    "COLLECTIVE_TIMEOUT_S",
    "INIT_TIMEOUT_S",
    "CollectiveTimeout",
    "DistEnv",
    "accumulate",
    "all_reduce_overflow_",
    "check_reducible",
    "cleanup_distributed",
    "gather_ints",
    "init_distributed",
    "is_data_parallel",
    "no_sync",
    "read_env",
    "rendezvous",
    "save_on_rank0",
    "unwrap",
    "wrap_ddp",
]

T = TypeVar("T")

TORCHRUN_VARS: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
"""The environment variables torchrun sets for each process that `read_env` reads."""

INIT_TIMEOUT_S = 60.0
"""How long `init_distributed` waits for every process to join (env MIXPREC_INIT_TIMEOUT)."""
COLLECTIVE_TIMEOUT_S = 300.0
"""How long a rank waits at a Learner collective for the others (env MIXPREC_COLLECTIVE_TIMEOUT)."""


class CollectiveTimeout(RuntimeError):
    """The other processes did not reach a collective (or joining the group) in time."""


def _seconds(env_name: str, default: float) -> float:
    raw = os.environ.get(env_name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"{env_name} must be a number of seconds > 0; got {raw!r}.")
    return value


def collective_timeout() -> timedelta:
    """The Learner collectives' timeout: MIXPREC_COLLECTIVE_TIMEOUT seconds, default 300."""
    return timedelta(seconds=_seconds("MIXPREC_COLLECTIVE_TIMEOUT", COLLECTIVE_TIMEOUT_S))


def gather_ints(
    value: int,
    what: str,
    timeout: timedelta,
    process_group: dist.ProcessGroup | None = None,
    advice: str = "",
) -> list[int]:
    """Every rank's `value` (an int64), by rank, gathered within `timeout`; past it a
    `CollectiveTimeout` names `what` and this rank (then `advice`), instead of hanging."""
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    backend = dist.get_backend(process_group)
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else "cpu"
    mine = torch.tensor([value], dtype=torch.int64, device=device)
    values = [torch.zeros_like(mine) for _ in range(world)]
    work = dist.all_gather(values, mine, group=process_group, async_op=True)
    try:
        work.wait(timeout=timeout)
    except RuntimeError as error:
        raise CollectiveTimeout(
            f"rank {rank} of {world} waited {timeout.total_seconds():g} s in {what} for the "
            f"other ranks, which did not reach it ({error}). {advice}Set "
            "MIXPREC_COLLECTIVE_TIMEOUT (seconds) or learn.ranks.timeout for ranks that are "
            "slow to get there."
        ) from error
    return [int(v.item()) for v in torch.cat(values).cpu()]  # one host sync


def rendezvous(
    what: str, timeout: timedelta, process_group: dist.ProcessGroup | None = None
) -> None:
    """Wait (at most `timeout`) until every rank of `process_group` has reached the
    collective `what` (e.g. "learn.save()"), and check they all reached the same one: a rank
    elsewhere, or never coming, raises a `CollectiveTimeout` / RuntimeError naming the
    collective and the ranks, instead of hanging. A no-op in one process."""
    if not is_data_parallel(process_group):
        return
    rank, world = dist.get_rank(process_group), dist.get_world_size(process_group)
    code = int.from_bytes(hashlib.sha1(what.encode()).digest()[:7], "big")
    advice = (
        f"Every rank must call {what} (e.g. not `if rank == 0: learn.save(...)`: call it on "
        "every rank, rank 0 writes). "
    )
    codes = gather_ints(code, what, timeout, process_group, advice)
    if set(codes) != {code}:
        elsewhere = [r for r, c in enumerate(codes) if c != code]
        raise RuntimeError(
            f"rank {rank} of {world} is in {what} but rank(s) {elsewhere} are in another "
            f"collective: every rank must call {what} at the same point (e.g. not "
            "`if rank == 0: learn.save(...)`; call it on every rank, rank 0 writes)."
        )


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun launch; a single process is rank 0 of 1."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1


def read_env(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE (default `os.environ`);
    with neither RANK nor WORLD_SIZE set, a single process."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return DistEnv()
    values: dict[str, int] = {}
    for name in TORCHRUN_VARS:
        raw = environ.get(name)
        if raw is None:
            continue
        try:
            values[name] = int(raw)
        except ValueError:
            raise ValueError(
                f"environment variable {name} must be an integer; got {raw!r}. Launch with "
                "torchrun, which sets it, or unset it to run as a single process."
            ) from None
    missing = [name for name in ("RANK", "WORLD_SIZE") if name not in values]
    if missing:
        raise ValueError(
            f"torchrun's environment is incomplete: {missing[0]} is not set but "
            f"{'WORLD_SIZE' if missing[0] == 'RANK' else 'RANK'} is. Launch with torchrun, or "
            "set both (or neither, for a single process)."
        )
    rank, world_size = values["RANK"], values["WORLD_SIZE"]
    local_rank = values.get("LOCAL_RANK", rank)
    local_world_size = values.get("LOCAL_WORLD_SIZE", world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"expected 0 <= RANK < WORLD_SIZE; got RANK={rank}, WORLD_SIZE={world_size}."
        )
    if local_world_size < 1 or not 0 <= local_rank < local_world_size:
        raise ValueError(
            "expected 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE; got "
            f"LOCAL_RANK={local_rank}, LOCAL_WORLD_SIZE={local_world_size}."
        )
    return DistEnv(rank, local_rank, world_size, local_world_size)


def init_distributed(backend: str | None = None, *, timeout: timedelta | None = None) -> DistEnv:
    """Join the process group torchrun describes and return this process's place.

    `backend` defaults to "nccl" when CUDA is available, else "gloo"; under NCCL the current
    CUDA device becomes cuda:LOCAL_RANK. A single process, or a group already initialized,
    is left as it is. `timeout` (default MIXPREC_INIT_TIMEOUT seconds, else 60) bounds the
    wait for every process to join: past it a `CollectiveTimeout` names this rank and says
    what to do, rather than hanging (given explicitly, it is the collectives' timeout too).
    """
    env = read_env()
    if not env.is_distributed or (dist.is_available() and dist.is_initialized()):
        return env
    if not dist.is_available():
        raise RuntimeError(
            "this torch build has no torch.distributed; install a build with it to run "
            f"{env.world_size} processes."
        )
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        torch.cuda.set_device(env.local_rank)
    given = timeout
    if timeout is None:
        timeout = timedelta(seconds=_seconds("MIXPREC_INIT_TIMEOUT", INIT_TIMEOUT_S))
    try:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    except ValueError as error:  # env:// without MASTER_ADDR or MASTER_PORT
        raise ValueError(
            f"WORLD_SIZE={env.world_size} and RANK={env.rank} say this is one of "
            f"{env.world_size} processes, but joining them failed: {error}. Launch with "
            "torchrun (it sets MASTER_ADDR and MASTER_PORT for every process), or unset "
            "WORLD_SIZE and RANK to run as one process."
        ) from error
    except RuntimeError as error:  # torch's DistStoreError too
        if "timed out" not in str(error).lower() and "timeout" not in str(error).lower():
            raise
        raise CollectiveTimeout(
            f"rank {env.rank} of {env.world_size}: joining the process group "
            f"(init_process_group) did not complete within {timeout.total_seconds():g} s: "
            f"{error}. Start all {env.world_size} processes (torchrun "
            "--nproc_per_node=N starts them), or unset WORLD_SIZE and RANK to run as one "
            "process; for a slower start set MIXPREC_INIT_TIMEOUT (seconds) or pass "
            "init_distributed(timeout=...)."
        ) from error
    if given is None:  # the short wait was for joining: collectives get torch's default
        try:
            from torch.distributed.distributed_c10d import _set_pg_timeout

            _set_pg_timeout(dist.default_pg_timeout)
        except (ImportError, RuntimeError, ValueError, AssertionError):
            pass  # an older torch: collectives keep the joining timeout
    return env


def cleanup_distributed() -> None:
    """Leave the process group, if one was initialized."""
    if dist.is_available() and dist.is_initialized():
        # A dropped DDP model lingers in a reference cycle until the next collection; left
        # to the interpreter's exit, it can abort the process ("terminate called without an
        # active exception") once the group is gone. Free it while the group still exists.
        gc.collect()
        dist.destroy_process_group()


def is_data_parallel(process_group: dist.ProcessGroup | None = None) -> bool:
    """Whether torch.distributed is initialized with more than one process in `process_group`
    (None: the default group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def all_reduce_overflow_(
    found_inf: torch.Tensor, process_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Take the maximum of the overflow flag `found_inf` over the ranks of `process_group`, in
    place, so every rank makes the same step-or-skip decision; a no-op in one process."""
    if is_data_parallel(process_group):
        dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=process_group)
    return found_inf


def check_reducible(
    dtypes: Iterable[torch.dtype],
    device: torch.device | str = "cpu",
    process_group: dist.ProcessGroup | None = None,
) -> None:
    """Raise a TypeError naming the dtype if the backend cannot all-reduce it (one probe each).

    A collective: every rank of `process_group` must call it with the same dtypes.
    """
    if not is_data_parallel(process_group):
        return
    for dtype in dtypes:
        probe = torch.zeros(1, dtype=dtype, device=device)
        try:
            dist.all_reduce(probe, group=process_group)
        except (RuntimeError, TypeError, ValueError) as error:
            backend = dist.get_backend(process_group)
            raise TypeError(
                f"the {backend} backend of torch {torch.__version__} cannot all-reduce "
                f"{dtype} tensors on {device} ({error}). Use a backend or torch version that "
                "can (gloo in torch 2.13 reduces fp16 and bf16 on CPU; NCCL reduces both on "
                "GPU), or train in the other half dtype."
            ) from error


def wrap_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.Module:
    """Wrap a (half) model in DistributedDataParallel; return it unchanged in one process.

    DDP buckets gradients by dtype, so a half model's grads are all-reduced in half precision
    (the fp32 norm layers in a bucket of their own). Checks first that the backend can
    reduce every dtype the model trains. `ddp_kwargs` go to DDP; wrap after `model_to_half`
    and before building the optimizer.
    """
    if isinstance(model, DistributedDataParallel):
        raise TypeError("the model is already wrapped in DistributedDataParallel; wrap it once.")
    process_group = ddp_kwargs.get("process_group")
    if not is_data_parallel(process_group):
        return model
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({p.dtype for p in trainable}, key=str)
    device = trainable[0].device if trainable else torch.device("cpu")
    check_reducible(dtypes, device, process_group)
    return DistributedDataParallel(model, **ddp_kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DDP (for its state_dict); any other module as it is."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def no_sync(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Within: DDP does not reduce gradients in backward (they accumulate in the model's grads
    until a backward outside); a no-op when not `enabled` or for a module that is not DDP."""
    if enabled and isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


def accumulate(model: nn.Module, micro_batches: Iterable[T]) -> Iterator[T]:
    """Yield the micro-batches of one step; the loop body runs under DDP's `no_sync()` for all
    but the last, so gradients are all-reduced once per step, in its last backward."""
    batches = iter(micro_batches)
    try:
        current = next(batches)
    except StopIteration:
        return
    for following in batches:
        with no_sync(model):
            yield current
        current = following
    yield current


def save_on_rank0(
    obj: Any, path: str | os.PathLike[str], process_group: dist.ProcessGroup | None = None
) -> Path:
    """Write `obj` to `path` atomically (`save_checkpoint`: a temporary file, then a rename) on
    rank 0 of `process_group` only; every rank returns once the file is there (a barrier, so
    every rank can load it next), or raises if rank 0 could not write it. Returns the path."""
    if not is_data_parallel(process_group):
        return save_checkpoint(obj, path)
    error: BaseException | None = None
    if dist.get_rank(process_group) == 0:
        try:
            save_checkpoint(obj, path)
        except Exception as e:  # tell the other ranks before raising, or they would wait
            error = e
    status = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(status, group=process_group, group_src=0)  # also the barrier
    if error is not None:
        raise error
    if status[0] is not None:
        raise RuntimeError(f"rank 0 could not write {path}: {status[0]}")
    return Path(path)


@torch.no_grad()
def broadcast_from_rank0_(
    tensors: Iterable[torch.Tensor], process_group: dist.ProcessGroup | None = None
) -> None:
    """Overwrite `tensors` in place with rank 0's values: one broadcast per dtype and device;
    nothing outside data-parallel runs."""
    if not is_data_parallel(process_group):
        return
    kinds: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        kinds.setdefault((t.dtype, t.device), []).append(t.detach())
    for group in kinds.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.broadcast(flat, src=0, group=process_group)
        views = [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in group]), group)]
        torch._foreach_copy_(group, views)
