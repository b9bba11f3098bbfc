"""Shared test settings: one thread (tiny fp16 kernels on 2 cores run far slower with two)."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
