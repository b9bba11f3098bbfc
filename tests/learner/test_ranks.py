"""mixprec.learner.ranks in one process: the loaders each rank gets, and `Ranks` switched off
(a single process). The 2-process runs are in test_learner_distributed.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers.learner import make_learner
from mixprec.core.checkpoint import load_checkpoint
from mixprec.learner.ranks import Ranks, distributed_loader, set_epoch, shard_loader

N = 21  # not a multiple of 2 ranks x batch 4: the shares are padded, the shards uneven


def _dataset() -> TensorDataset:
    return TensorDataset(torch.arange(N), torch.arange(N) % 3)


def _samples(dl) -> list[int]:
    return torch.cat([x for x, _ in dl]).tolist()


def test_distributed_loaders_split_each_epoch_and_reshuffle_per_epoch() -> None:
    g = torch.Generator().manual_seed(1)
    dl = DataLoader(_dataset(), batch_size=4, shuffle=True, drop_last=False, generator=g)
    loaders = [distributed_loader(dl, rank, 2, seed=7) for rank in range(2)]
    for rank, loader in enumerate(loaders):
        assert isinstance(loader.sampler, DistributedSampler)
        assert (loader.sampler.rank, loader.sampler.num_replicas) == (rank, 2)
        assert loader.batch_size == 4 and loader.generator is g
    orders = []
    for epoch in range(2):
        for loader in loaders:
            set_epoch(loader, epoch)
        shares = [_samples(loader) for loader in loaders]
        assert [len(s) for s in shares] == [11, 11]  # 21 padded to 22: same batches per rank
        assert set(shares[0]) | set(shares[1]) == set(range(N))
        assert len(set(shares[0]) & set(shares[1])) == 1  # the one padded sample
        orders.append(shares[0])
    assert orders[0] != orders[1]
    set_epoch(loaders[0], 0)
    assert _samples(loaders[0]) == orders[0]  # the same epoch gives the same order again


def test_an_unshuffled_loader_stays_unshuffled_and_a_distributed_one_is_kept() -> None:
    dl = DataLoader(_dataset(), batch_size=4)
    assert _samples(distributed_loader(dl, 1, 2)) == [*range(1, N, 2), 0]
    mine = DataLoader(_dataset(), sampler=DistributedSampler(_dataset(), 2, 0), batch_size=4)
    assert distributed_loader(mine, 0, 2) is mine


@pytest.mark.parametrize(
    "dl",
    [
        [(torch.zeros(2), torch.zeros(2))],
        DataLoader(_dataset(), sampler=[0, 1, 2]),
        DataLoader(_dataset(), sampler=torch.utils.data.RandomSampler(_dataset(), True)),
    ],
)
def test_a_training_loader_that_cannot_be_shared_out_is_refused(dl) -> None:
    with pytest.raises(TypeError, match="under torchrun the training loader must be a torch"):
        distributed_loader(dl, 0, 2)


def test_validation_shards_are_uneven_and_repeat_nothing() -> None:
    dl = DataLoader(_dataset(), batch_size=4, shuffle=True)
    shards = [_samples(shard_loader(dl, rank, 2)) for rank in range(2)]
    assert shards == [list(range(0, N, 2)), list(range(1, N, 2))]
    batches = [(torch.zeros(2), torch.zeros(2))]
    assert shard_loader(batches, 0, 2) is batches  # every rank evaluates it all


def test_ranks_in_one_process_is_off_and_passes_everything_through(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    ranks = Ranks()
    assert (ranks.enabled, ranks.rank, ranks.world_size, ranks.is_main) == (False, 0, 1, True)
    loss = torch.tensor(2.0)
    assert ranks.mean(loss) is loss
    totals = torch.ones(2)
    assert ranks.sum_totals(totals, 3, 2) == (totals, 3)
    model = torch.nn.Linear(2, 2)
    with ranks.training(model, None):
        assert ranks.train_module(model) is model and ranks.ddp is None
    assert ranks.own_rng({"rng": "mine", "rng_ranks": ["r0", "r1"]}) == "mine"  # 2 ranks wrote it
    with pytest.raises(TypeError, match="distributed must be True or False; got 'yes'"):
        Ranks("yes")


def test_a_single_process_learner_writes_the_checkpoint_it_always_did(tmp_path) -> None:
    learn = make_learner(tmp_path)
    assert not learn.ranks.enabled
    checkpoint = load_checkpoint(learn.save("one"))
    assert "rng" in checkpoint and "rng_ranks" not in checkpoint


def test_distributed_false_trains_alone_under_torchruns_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)  # joining the group would fail
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        Ranks()
    learn = make_learner(tmp_path, distributed=False)
    assert not learn.ranks.enabled
    learn.fit(1)
