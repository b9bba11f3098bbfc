"""Cache-sized passes over half gradients: cast, unscale and overflow check in one sweep.

Moving half gradients into fp32 and then unscaling and checking them is three passes over
memory when done tensor by tensor. Done in chunks of `CHUNK_NUMEL` elements, the second and
third passes read data that is still in cache, so the whole job costs about one copy: the
floor set by memory traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mixprec.core.flat_group import FlatGroup
from mixprec.core.master import ParamGroups

__all__ = [
    "CHUNK_NUMEL",
    "GPU_CHUNK_NUMEL",
    "Chunk",
    "chunk_numel",
    "copy_unscale_check_",
    "master_grad_pairs",
    "pair_chunks",
    "step_buffers",
]

CHUNK_NUMEL = 1 << 18
"""Elements per chunk on a CPU: 1 MiB of fp32, which stays in a core's L2."""

GPU_CHUNK_NUMEL = 1 << 23
"""Elements per chunk on other devices (GPUs): each chunk costs a few kernel launches and
tens of microseconds of Python, while a GPU moves a 2**18-element chunk in a few
microseconds; at 2**23 (32 MiB of fp32 scratch) the kernels outlast the launches."""


def chunk_numel(device: torch.device) -> int:
    """Elements per chunk on `device`: cache-sized on a CPU, launch-sized elsewhere."""
    return CHUNK_NUMEL if device.type == "cpu" else GPU_CHUNK_NUMEL


Chunk = tuple[list[torch.Tensor], list[torch.Tensor]]


def _pieces(t: torch.Tensor, chunk: int) -> list[torch.Tensor]:
    """`t` as 1-D pieces of at most `chunk` elements (whole if it cannot be viewed flat)."""
    if t.numel() <= chunk or not t.is_contiguous():
        return [t]
    return list(t.view(-1).split(chunk))


def pair_chunks(
    dst: Sequence[torch.Tensor], src: Sequence[torch.Tensor], chunk: int | None = None
) -> list[Chunk]:
    """Group matching (dst, src) tensors into chunks of about `chunk` elements (None: the
    `chunk_numel` of their device).

    Large tensors are split into 1-D pieces; small ones are batched so that one foreach
    kernel handles many of them.
    """
    if chunk is None:
        chunk = chunk_numel(dst[0].device) if dst else CHUNK_NUMEL
    chunks: list[Chunk] = []
    cur_dst: list[torch.Tensor] = []
    cur_src: list[torch.Tensor] = []
    size = 0
    for d, s in zip(dst, src):
        if d.shape != s.shape:
            raise ValueError(f"shape mismatch between {tuple(d.shape)} and {tuple(s.shape)}.")
        split = d.is_contiguous() and s.is_contiguous()
        d_pieces = _pieces(d, chunk) if split else [d]
        s_pieces = _pieces(s, chunk) if split else [s]
        for dp, sp in zip(d_pieces, s_pieces):
            if cur_dst and size + dp.numel() > chunk:
                chunks.append((cur_dst, cur_src))
                cur_dst, cur_src, size = [], [], 0
            cur_dst.append(dp)
            cur_src.append(sp)
            size += dp.numel()
    if cur_dst:
        chunks.append((cur_dst, cur_src))
    return chunks


def copy_unscale_check_(
    chunks: Sequence[Chunk],
    found_inf: torch.Tensor,
    inv_scale: torch.Tensor,
    *,
    accumulate: bool = False,
    zero_src: bool = False,
) -> None:
    """For each chunk: dst = src (or dst += src), then dst *= inv_scale, setting `found_inf`
    to 1 if any value is inf/nan; with `zero_src`, src is zeroed while still in cache.

    `found_inf` and `inv_scale` are 1-element fp32 tensors on the tensors' device. No host
    synchronisation.
    """
    move = torch._foreach_add_ if accumulate else torch._foreach_copy_
    check = torch._amp_foreach_non_finite_check_and_unscale_
    for dst, src in chunks:
        move(dst, src)
        check(dst, found_inf, inv_scale)
        if zero_src:
            torch._foreach_zero_(src)


def master_grad_pairs(
    model_params: ParamGroups, master_params: ParamGroups, flat_groups: Sequence[FlatGroup]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(master gradients, model gradients) to copy one into the other.

    Flat (`flat_groups` given): the master gradient's slices and the flat gradient buffers.
    Per tensor: every parameter with a gradient, its master's gradient allocated if missing;
    a master whose parameter has no gradient gets None, as in `model_g2master_g`.
    """
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    if flat_groups:
        for fg in flat_groups:
            fg.repair_grads()
            dst.extend(fg.master_grad_slices())
            src.extend(fg.grads)
        return dst, src
    for model_group, master_group in zip(model_params, master_params):
        for p, m in zip(model_group, master_group):
            if p.grad is None:
                m.grad = None
                continue
            if m.grad is None:
                m.grad = torch.empty_like(m)
            dst.append(m.grad)
            src.append(p.grad)
    return dst, src


def step_buffers(
    tensors: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Three 1-element fp32 tensors (found_inf, inv_scale, scale) on the one device of
    `tensors`, to reuse every step; None if they span several devices."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return None
    (device,) = devices
    found_inf, inv_scale, scale = (torch.zeros(1, device=device) for _ in range(3))
    return found_inf, inv_scale, scale
