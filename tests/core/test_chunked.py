"""Cache-sized passes: chunking, and cast + unscale + check in one sweep."""

import pytest
import torch

from mixprec.core.chunked import (
    CHUNK_NUMEL,
    GPU_CHUNK_NUMEL,
    copy_unscale_check_,
    pair_chunks,
)
from mixprec.engine.fused_adam import FusedAdamStep


def _halves(*shapes):
    return [torch.randn(s).half() * 100 for s in shapes]


def test_pair_chunks_splits_large_and_batches_small_tensors():
    src = _halves((3, 4), (5,), (40,), (2, 3))
    dst = [torch.empty(t.shape) for t in src]
    chunks = pair_chunks(dst, src, chunk=16)
    sizes = [sum(t.numel() for t in d) for d, _ in chunks]
    assert all(s <= 16 for s in sizes)
    assert sum(sizes) == sum(t.numel() for t in src)
    assert len(chunks[0][0]) == 1  # the 12-element tensor cannot share with the next 5
    # the 40-element tensor is split into 16 + 16 + 8 pieces that are views of it
    pieces = [d for ds, _ in chunks for d in ds if d.numel() in (16, 8)]
    assert [p.numel() for p in pieces] == [16, 16, 8]
    assert all(
        p.untyped_storage().data_ptr() == dst[2].untyped_storage().data_ptr() for p in pieces
    )
    for ds, ss in chunks:
        assert [d.shape for d in ds] == [s.shape for s in ss]


def test_chunks_are_cache_sized_on_a_cpu_and_launch_sized_on_other_devices():
    n = 3 * GPU_CHUNK_NUMEL // 2
    for device, size in (("cpu", CHUNK_NUMEL), ("meta", GPU_CHUNK_NUMEL)):
        dst = [torch.empty(n, device=device), torch.empty(5, device=device)]
        src = [torch.empty(n, device=device, dtype=torch.bfloat16), dst[1].bfloat16()]
        chunks = pair_chunks(dst, src)
        sizes = [sum(t.numel() for t in d) for d, _ in chunks]
        assert sizes[0] == size and max(sizes) == size
        assert sum(t.numel() for d, _ in chunks for t in d) == n + 5
    step = FusedAdamStep(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
    assert step._scratch_for(torch.device("meta")).numel() == GPU_CHUNK_NUMEL
    assert step._scratch_for(torch.device("cpu")).numel() == CHUNK_NUMEL


def test_pair_chunks_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"shape mismatch between \(3,\) and \(4,\)"):
        pair_chunks([torch.empty(3)], [torch.empty(4)])


def test_copy_unscale_check_matches_copy_then_unscale():
    src = _halves((300,), (7, 9), (1000,))
    dst = [torch.empty(t.shape) for t in src]
    found, inv = torch.zeros(1), torch.full((1,), 1 / 1024)
    copy_unscale_check_(pair_chunks(dst, src, chunk=128), found, inv)
    expected = [t.float() for t in src]
    torch._amp_foreach_non_finite_check_and_unscale_(expected, torch.zeros(1), inv)
    assert all(torch.equal(d, e) for d, e in zip(dst, expected))
    assert found.item() == 0.0


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_copy_unscale_check_finds_non_finite_in_any_chunk(bad):
    src = _halves((500,))
    src[0][437] = bad
    dst = [torch.empty(500)]
    found = torch.zeros(1)
    copy_unscale_check_(pair_chunks(dst, src, chunk=64), found, torch.ones(1))
    assert found.item() == 1.0


def test_copy_unscale_check_accumulates_and_zeroes_the_source():
    src = _halves((50,), (70,))
    before = [t.clone() for t in src]
    dst = [torch.ones(50), torch.ones(70)]
    copy_unscale_check_(
        pair_chunks(dst, src, chunk=32),
        torch.zeros(1),
        torch.full((1,), 0.5),
        accumulate=True,
        zero_src=True,
    )
    for d, b in zip(dst, before):
        assert torch.equal(d, (1 + b.float()) * 0.5)
    assert all(not s.any() for s in src)
