"""mixprec.parallel.distributed in one process: torchrun's environment, the pass-throughs, no_sync in
accumulation (on a 1-process gloo group), and the optimizer's data-parallel accumulation.
The 2-process runs are in test_distributed_e2e.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import mixprec.engine.optimizer as mpo
import mixprec.parallel.distributed as mpd
from mixprec import MixedPrecisionOptimizer, model_to_half
from mixprec.parallel.distributed import (
    DistEnv,
    accumulate,
    all_reduce_overflow_,
    check_reducible,
    init_distributed,
    is_data_parallel,
    no_sync,
    read_env,
    save_on_rank0,
    unwrap,
    wrap_ddp,
)

TORCHRUN = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}


def test_read_env_without_torchrun_is_one_process() -> None:
    env = read_env({})
    assert env == DistEnv(rank=0, local_rank=0, world_size=1, local_world_size=1)
    assert env.is_main and not env.is_distributed


def test_read_env_reads_torchrun_variables() -> None:
    env = read_env(TORCHRUN)
    assert env == DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2)
    assert env.is_distributed and not env.is_main


@pytest.mark.parametrize(
    ("environ", "match"),
    [
        ({"RANK": "0"}, "WORLD_SIZE is not set but RANK is"),
        ({**TORCHRUN, "WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer; got 'two'"),
        ({**TORCHRUN, "RANK": "4"}, r"0 <= RANK < WORLD_SIZE; got RANK=4, WORLD_SIZE=4"),
        ({**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2, LOCAL_WORLD_SIZE=2"),
    ],
)
def test_read_env_rejects_broken_environments(environ: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        read_env(environ)


def test_single_process_helpers_pass_through(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert init_distributed() == DistEnv()
    assert not dist.is_initialized() and not is_data_parallel()
    model = nn.Linear(2, 2)
    assert wrap_ddp(model) is model and unwrap(model) is model
    flag = torch.ones(1)
    assert all_reduce_overflow_(flag) is flag and flag.item() == 1.0
    with no_sync(model):
        pass
    assert list(accumulate(model, [1, 2, 3])) == [1, 2, 3]
    assert list(accumulate(model, [])) == []
    path = save_on_rank0({"w": torch.arange(3)}, tmp_path / "ckpt.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


def test_save_on_rank0_writes_atomically(tmp_path, monkeypatch):
    path = save_on_rank0(nn.Linear(2, 2).state_dict(), tmp_path / "ckpt.pt")
    saved = torch.load(path, weights_only=True)
    assert "_metadata" in vars(saved)  # the state_dict as it was, its versions kept

    def torn(obj, f):  # a save that dies half-way through the file
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr("mixprec.core.checkpoint.torch.save", torn)
    with pytest.raises(OSError, match="disk full"):
        save_on_rank0({"w": torch.zeros(2)}, path)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind ...
    assert torch.load(path, weights_only=True).keys() == saved.keys()  # ... the old file whole


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A gloo group of one process, for DDP in this process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_accumulate_holds_no_sync_for_all_but_the_last(one_process_group: None) -> None:
    ddp = DistributedDataParallel(model_to_half(nn.Linear(4, 2)))
    syncing = []
    for _ in accumulate(ddp, range(3)):
        syncing.append(ddp.require_backward_grad_sync)  # False inside no_sync()
    assert syncing == [False, False, True]
    assert ddp.require_backward_grad_sync
    with no_sync(ddp, enabled=False):
        assert ddp.require_backward_grad_sync
    with no_sync(ddp):
        assert not ddp.require_backward_grad_sync
    with pytest.raises(TypeError, match="already wrapped in DistributedDataParallel"):
        wrap_ddp(ddp)


def test_check_reducible_names_the_dtype_the_backend_cannot_reduce(
    one_process_group: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def all_reduce(tensor: torch.Tensor, group=None) -> None:
        if tensor.dtype == torch.bfloat16:
            raise RuntimeError("Invalid scalar type")

    monkeypatch.setattr(mpd, "is_data_parallel", lambda group=None: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    check_reducible([torch.float16])
    with pytest.raises(TypeError, match=r"gloo backend .* cannot all-reduce torch.bfloat16"):
        check_reducible([torch.float16, torch.bfloat16])


def _two_micro_batches(opt: MixedPrecisionOptimizer, model: nn.Module) -> list[torch.Tensor]:
    grads = []
    for seed in (1, 2):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed)).half()
        opt.backward(model(x).float().sum())
        grads.append(model.weight.grad.clone())
    return grads


@pytest.mark.parametrize("flat", [False, True])
def test_data_parallel_accumulates_in_the_model_grads_for_ddp(
    monkeypatch: pytest.MonkeyPatch, flat: bool
) -> None:
    # under DDP's no_sync() the reducing backward must find every micro-batch in p.grad
    monkeypatch.setattr(mpo, "is_data_parallel", lambda group=None: True)
    model = model_to_half(nn.Linear(4, 2))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = MixedPrecisionOptimizer(sgd, 8.0, flat_master=flat)
    first, both = _two_micro_batches(opt, model)
    single = model_to_half(nn.Linear(4, 2))
    sgd = torch.optim.SGD(single.parameters(), lr=0.1)
    single_opt = MixedPrecisionOptimizer(sgd, 8.0, flat_master=flat, data_parallel=False)
    _, second_alone = _two_micro_batches(single_opt, single)  # fp32 path: moved to masters
    torch.testing.assert_close(both, first + second_alone)
    assert opt.step()
    assert opt.master_params[0][0].grad is not None


def test_data_parallel_must_be_a_bool() -> None:
    model = model_to_half(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="data_parallel must be True or False; got 'no'"):
        MixedPrecisionOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), data_parallel="no")
