"""Splitting a batch along dim 0: tensors, dicts (Hugging Face ``BatchEncoding`` too),
lists and tuples, nested."""

from __future__ import annotations

from typing import Any, Optional

import torch


def batch_size(batch: Any) -> Optional[int]:
    """Length of dim 0 of the first tensor found in ``batch`` (None if it holds none).

    >>> batch_size({"x": torch.zeros(5, 3)})
    5
    """
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    if isinstance(batch, dict) or hasattr(batch, "items"):
        values = list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        return None
    for v in values:
        n = batch_size(v)
        if n is not None:
            return n
    return None


def split_batch(batch: Any, parts: int) -> list[Any]:
    """``batch`` cut into ``parts`` consecutive pieces along dim 0, sizes differing by at most one.

    Non-tensor leaves are shared by every piece.

    >>> [p["x"].shape[0] for p in split_batch({"x": torch.zeros(5, 2), "tag": "a"}, 2)]
    [3, 2]
    """
    n = batch_size(batch)
    if n is None:
        raise ValueError("cannot split a batch that holds no tensor with a batch dimension")
    if not 1 <= parts <= n:
        raise ValueError(f"cannot split a batch of {n} into {parts} parts")
    sizes = [n // parts + (1 if i < n % parts else 0) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [_slice(batch, s, s + size, n) for s, size in zip(starts, sizes)]


def _slice(batch: Any, start: int, stop: int, n: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[start:stop] if batch.dim() and batch.shape[0] == n else batch
    if isinstance(batch, dict) or hasattr(batch, "items"):
        pieces = {k: _slice(v, start, stop, n) for k, v in batch.items()}
        try:
            return type(batch)(pieces)
        except TypeError:
            return pieces
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_slice(v, start, stop, n) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_slice(v, start, stop, n) for v in batch)
    return batch
