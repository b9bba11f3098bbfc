"""A 2-rank script whose training data is an IterableDataset sharded unevenly (rank 0: 3
batches, rank 1: 4), or evenly with `even` as argv[2]: each rank must get an error naming the
uneven shards, not hang (or, even, train). Prints each rank's error, or "trained"."""

import os
import sys

import torch
from torch.utils.data import DataLoader, IterableDataset

torch.set_num_threads(1)

from helpers.learner import tiny_data, tiny_model  # noqa: E402
from mixprec import DataBunch, Learner  # noqa: E402


class Shard(IterableDataset):
    """This rank's samples: 12 on rank 0, 16 on rank 1 (12 each if `even`)."""

    def __init__(self, rank: int, even: bool) -> None:
        self.n = 12 if even or rank == 0 else 16
        g = torch.Generator().manual_seed(rank)
        self.x = torch.randn(self.n, 8, generator=g)

    def __iter__(self):
        for x in self.x:
            yield x, (x[0] > 0).long()


rank = int(os.environ["RANK"])
valid = tiny_data().valid_dl.dl
train = DataLoader(Shard(rank, len(sys.argv) > 2 and sys.argv[2] == "even"), batch_size=4)
torch.manual_seed(0)
learn = Learner(
    DataBunch(train, valid, device="cpu"), tiny_model(), path=sys.argv[1], progress=False
)
try:
    learn.fit(2)
    print("trained", learn.iteration)
except RuntimeError as error:
    print(f"{type(error).__name__}: {error}")
sys.stdout.flush()
os._exit(0)  # after an error the group is broken: leave without tearing it down
