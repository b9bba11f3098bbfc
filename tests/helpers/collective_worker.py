"""A 2-rank script in which rank 0 alone calls learn.save() and then both fit: each rank
must get an error naming the collective, not hang. Prints each rank's error."""

import os
import sys

import torch

torch.set_num_threads(1)

from helpers.learner import make_learner  # noqa: E402

learn = make_learner(sys.argv[1])
try:
    if learn.ranks.rank == 0:
        learn.save("only_rank0")
    learn.fit(1)
    print("no error")
except RuntimeError as error:
    print(f"{type(error).__name__}: {error}")
sys.stdout.flush()
os._exit(0)  # the group is broken by design: leave without tearing it down
