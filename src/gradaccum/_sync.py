"""Gradient-sync control for DDP and FSDP2, and the cross-rank sums of a window.

Only public APIs: DDP's ``no_sync()`` and FSDP2's ``set_requires_gradient_sync()``. Both
must be in force before the forward pass of a micro-batch, because DDP decides at forward
time whether the following backward all-reduces.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Sequence

import torch
import torch.distributed as dist


def data_parallel_world_size(model: torch.nn.Module) -> int:
    """Ranks that average this model's gradients: 1 unless it is DDP/FSDP-wrapped.

    >>> data_parallel_world_size(torch.nn.Linear(2, 2))
    1
    """
    wrapped = hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")
    if wrapped and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


@contextlib.contextmanager
def _fsdp2_no_sync(model: torch.nn.Module):
    model.set_requires_gradient_sync(False)  # type: ignore[operator]
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)  # type: ignore[operator]


def skip_gradient_sync(model: torch.nn.Module) -> ContextManager[None]:
    """A context in which forward and backward do not synchronise gradients across ranks.

    A plain module needs nothing, so the context is empty.

    >>> with skip_gradient_sync(torch.nn.Linear(2, 2)):
    ...     pass
    """
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp2_no_sync(model)
    if hasattr(model, "no_sync"):
        return model.no_sync()  # type: ignore[operator,return-value]
    return contextlib.nullcontext()


def global_sums(values: Sequence[float], device: torch.device, world_size: int) -> list[float]:
    """Sum ``values`` over all ranks in one small all-reduce (float64, so counts stay exact).

    >>> global_sums([3.0, 1.5], torch.device("cpu"), world_size=1)
    [3.0, 1.5]
    """
    if world_size == 1:
        return [float(v) for v in values]
    # gloo has no float64 reduction on CUDA tensors; NCCL has no CPU tensors.
    backend = dist.get_backend()
    dev = device if backend == "nccl" else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def rank_vector(world_size: int, value: float) -> list[float]:
    """``value`` at this rank's position, zeros elsewhere: summed over ranks, it gives
    every rank's value.

    >>> rank_vector(1, 3.0)
    [3.0]
    """
    rank = dist.get_rank() if world_size > 1 else 0
    return [float(value) if r == rank else 0.0 for r in range(world_size)]
