"""Shared test settings: one thread (tiny fp16 kernels on 2 cores run far slower with two),
and every test leaves torch's global state (autocast, grad mode, default dtype, threads) as
it found it, or fails."""

from __future__ import annotations

from typing import Any

import pytest
import torch

torch.set_num_threads(1)

pytest_plugins = ["pytester"]

_AUTOCAST_DEVICES = ("cpu", "cuda")


def global_torch_state() -> dict[str, Any]:
    """The process-wide torch settings a test must not leave changed."""
    state: dict[str, Any] = {}
    for device in _AUTOCAST_DEVICES:
        state[f"autocast enabled ({device})"] = torch.is_autocast_enabled(device)
        state[f"autocast dtype ({device})"] = torch.get_autocast_dtype(device)
    state["grad enabled"] = torch.is_grad_enabled()
    state["default dtype"] = torch.get_default_dtype()
    state["threads"] = torch.get_num_threads()
    return state


def restore_global_torch_state(state: dict[str, Any]) -> None:
    """Set back what `global_torch_state` returned."""
    for device in _AUTOCAST_DEVICES:
        torch.set_autocast_enabled(device, state[f"autocast enabled ({device})"])
        torch.set_autocast_dtype(device, state[f"autocast dtype ({device})"])
    torch.set_grad_enabled(state["grad enabled"])
    torch.set_default_dtype(state["default dtype"])
    torch.set_num_threads(state["threads"])


@pytest.fixture(autouse=True)
def _global_torch_state_unchanged() -> Any:
    """Fail a test that leaves global torch state changed, after setting it back (so the
    tests after it are not run in that state)."""
    before = global_torch_state()
    yield
    after = global_torch_state()
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    if changed:
        restore_global_torch_state(before)
        shown = "; ".join(f"{k}: {was} -> {now}" for k, (was, now) in changed.items())
        pytest.fail(f"the test left global torch state changed: {shown}", pytrace=False)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
