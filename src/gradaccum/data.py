"""Windows of exactly B examples, cut into micro-batches by a token budget.

Because gradaccum weighs every item, a window's update does not depend on how the window is
cut into micro-batches. So a window can be sorted by length and cut by padded tokens:
short texts travel together, long ones in small groups, and little compute goes to padding.
A token budget also bounds memory by what actually runs out (tokens), not by a sample count.

:class:`TokenBudgetSampler` is a ``batch_sampler`` for a standard ``DataLoader`` (any
``collate_fn``, e.g. ``DataCollatorWithPadding``). Passed to the ``Accumulator`` as
``steps``, it also tells the engine how many micro-batches each window has.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed as dist

from ._text import short

__all__ = ["TokenBudgetSampler", "cut_by_tokens", "sequence_ids", "sequence_means"]


def cut_by_tokens(lengths: Sequence[int], max_tokens: int, per_micro_batch: Optional[float] = None) -> list[list[int]]:
    """Positions 0..n-1 sorted by length (longest first) and cut into runs whose padded size
    (rows x longest row) stays within ``max_tokens``; a longer sample gets a run of its own.

    Among the cuts that fit, the one with the fewest padded tokens plus ``per_micro_batch``
    tokens for each run (the fixed cost of one more forward and backward; default
    ``max_tokens / 32``) is chosen exactly, by dynamic programming over the sorted lengths.

    Example:
        >>> cut_by_tokens([5, 30, 7, 6, 28], max_tokens=60, per_micro_batch=10)
        [[1, 4], [2, 3, 0]]
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1 (padded tokens per micro-batch); got {max_tokens!r}")
    cost = max_tokens / 32 if per_micro_batch is None else float(per_micro_batch)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    sizes = [lengths[i] for i in order]
    n = len(sizes)
    best = [0.0] + [math.inf] * n  # best[j]: the cheapest cut of the j longest
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            rows = j - i
            if rows > 1 and rows * sizes[i] > max_tokens:
                break  # sorted: a run that starts earlier is only wider
            value = best[i] + rows * sizes[i] + cost
            if value < best[j]:
                best[j], start[j] = value, i
    runs: list[list[int]] = []
    j = n
    while j > 0:
        runs.append(order[start[j]:j])
        j = start[j]
    return runs[::-1]


class TokenBudgetSampler:
    """Micro-batches (lists of dataset indices) for windows of ``window`` examples per rank.

    Each epoch the indices are shuffled by ``seed`` and epoch and split across ranks as
    ``DistributedSampler`` does (padded by repeating the first indices so every rank gets as
    many). Each rank's indices are cut into windows of exactly ``window`` examples (the last
    may be partial); each window is sorted by length and cut by :func:`cut_by_tokens`
    (fewest padded tokens, plus a fixed cost per micro-batch, within the budget).

    Give it to the ``Accumulator`` as ``steps`` and the engine learns each window's number
    of micro-batches from it. Ranks whose windows were cut into different numbers of
    micro-batches stand in with zero-weight micro-batches, so the update stays exact.

    Args:
        lengths: each example's length in tokens (after truncation).
        window: examples per optimizer step on each rank.
        max_tokens: padded tokens per micro-batch (rows x longest row).
        shuffle: shuffle each epoch (by ``seed`` and epoch); else dataset order.
        seed: the shuffle's seed; the same on every rank.
        rank, world_size: default: from ``torch.distributed`` when initialised, else 0 and 1.

    Example:
        >>> sampler = TokenBudgetSampler([len(x) for x in ds["input_ids"]], window=64, max_tokens=2048)  # doctest: +SKIP
        >>> loader = DataLoader(ds, batch_sampler=sampler, collate_fn=DataCollatorWithPadding(tok))  # doctest: +SKIP
        >>> acc = Accumulator(model, optimizer, steps=sampler)  # doctest: +SKIP
        >>> for epoch in range(3):  # doctest: +SKIP
        ...     sampler.set_epoch(epoch)
        ...     for window in acc.windows(loader):
        ...         for batch in window:
        ...             window.backward(model(**batch).loss, num_items=len(batch["labels"]))
        ...         window.step()
    """

    def __init__(self, lengths: Sequence[int], window: int, max_tokens: int, *, shuffle: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        for name, value in (("window", window), ("max_tokens", max_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")
        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("lengths must be a non-empty list of token counts >= 1, one per example")
        if world_size is None:
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.window, self.max_tokens, self.shuffle, self.seed = window, max_tokens, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0
        self._cache: Optional[tuple[int, list[list[list[int]]]]] = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Use ``epoch``'s order; skip the first ``start`` micro-batches (a resumed run: the
        micro-batches of this epoch it already consumed).

        Example:
            >>> sampler.set_epoch(3, start=consumed)  # doctest: +SKIP
        """
        self.epoch, self.start = int(epoch), int(start)

    def windows(self, epoch: Optional[int] = None) -> list[list[list[int]]]:
        """This rank's windows of ``epoch`` (default: the current one), each a list of micro-batches."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.lengths)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_rank = math.ceil(n / self.world_size)
        order += order[: per_rank * self.world_size - n]  # as DistributedSampler pads
        mine = order[self.rank::self.world_size]
        out = []
        for w in range(0, len(mine), self.window):
            chunk = mine[w:w + self.window]
            runs = cut_by_tokens([self.lengths[i] for i in chunk], self.max_tokens)
            out.append([[chunk[j] for j in run] for run in runs])
        self._cache = (epoch, out)
        return out

    def window_plan(self) -> list[int]:
        """Micro-batches of each window this pass yields, from ``start`` (the first may be
        what is left of a window). The ``Accumulator`` reads it when a loop over windows starts."""
        plan, skip = [], self.start
        for w in self.windows():
            if skip >= len(w):
                skip -= len(w)
                continue
            plan.append(len(w) - skip)
            skip = 0
        return plan

    def __iter__(self) -> Iterator[list[int]]:
        flat = [mb for w in self.windows() for mb in w]
        return iter(flat[self.start:])

    def __len__(self) -> int:
        return max(0, sum(len(w) for w in self.windows()) - self.start)

    def padding(self) -> tuple[int, int]:
        """(padded tokens, real tokens) of this rank's current epoch: the cost of padding.

        Example:
            >>> padded, real = sampler.padding(); round(padded / real, 2)  # doctest: +SKIP
            1.04
        """
        padded = real = 0
        for w in self.windows():
            for mb in w:
                lens = [self.lengths[i] for i in mb]
                padded += len(lens) * max(lens)
                real += sum(lens)
        return padded, real


def sequence_ids(position_ids: Optional[torch.Tensor] = None, cu_seqlens: Optional[torch.Tensor] = None,
                 length: Optional[int] = None) -> torch.Tensor:
    """Which packed sequence each token belongs to, numbered 0, 1, ... along the row.

    Give ``position_ids`` of packed rows (flattened: a new sequence starts where they restart
    at 0, as padding-free collators write them, and so at every row), or ``cu_seqlens``
    (cumulative lengths from 0, as flash-attention's varlen kernels take them) with the
    flattened ``length``.

    Example:
        >>> sequence_ids(position_ids=torch.tensor([0, 1, 2, 0, 1, 0]))
        tensor([0, 0, 0, 1, 1, 2])
        >>> sequence_ids(cu_seqlens=torch.tensor([0, 3, 5, 6]), length=6)
        tensor([0, 0, 0, 1, 1, 2])
    """
    if (position_ids is None) == (cu_seqlens is None):
        raise ValueError("give either position_ids (restarting at 0 for each sequence) or cu_seqlens, not both or neither")
    if position_ids is not None:
        pos = _integers(position_ids, "position_ids").reshape(-1)
        if int(pos[0]) != 0:
            raise ValueError(f"position_ids must start at 0 (each packed sequence restarts at 0, the row's first "
                             f"included); the first is {int(pos[0])}. Pass the collator's position_ids unshifted")
        return torch.cumsum((pos == 0).long(), 0) - 1
    assert cu_seqlens is not None
    bounds = _integers(cu_seqlens, "cu_seqlens").reshape(-1).long()
    n = int(length) if length is not None else int(bounds[-1])
    if bounds[0] != 0 or bool((bounds[1:] < bounds[:-1]).any()) or int(bounds[-1]) != n:
        raise ValueError(f"cu_seqlens must rise from 0 to the row's length {n}; got {bounds.tolist()}")
    return torch.bucketize(torch.arange(n, device=bounds.device), bounds[1:], right=True)


def _integers(value: Any, name: str) -> torch.Tensor:
    """``value`` as a non-empty integer tensor (a list of ints is taken too), or why not."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(f"{name} must be a tensor (or list) of integers; got {type(value).__name__}") from None
    if value.numel() == 0:
        raise ValueError(f"{name} is empty: a packed row holds at least one token")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        whole = value.is_floating_point() and bool((value == value.round()).all())
        raise TypeError(f"{name} must be integers; got {value.dtype}"
                        + (" (convert it with .long())" if whole else " with fractional values: they index tokens"))
    return value


def sequence_means(token_losses: torch.Tensor, seq_ids: torch.Tensor,
                   mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence means of packed token losses: ``(means, counted)``.

    ``means[s]`` is the mean of sequence s's counted tokens (``mask``: the tokens the loss
    counts, e.g. completion tokens, labels other than -100); ``counted`` says which sequences
    have any. A "mean over sequences of per-sequence token means" is then
    ``means[counted].mean()``, with ``num_items = counted.sum()`` sequences: the same loss as
    the sequences unpacked, whatever the packing, the micro-batches and the ranks, because
    the window weighs each micro-batch by its sequences.

    Example:
        >>> losses = torch.tensor([1.0, 3.0, 5.0, 2.0])
        >>> means, counted = sequence_means(losses, torch.tensor([0, 0, 0, 1]))
        >>> means.tolist(), counted.tolist()
        ([3.0, 2.0], [True, True])
    """
    if not isinstance(token_losses, torch.Tensor) or not token_losses.is_floating_point():
        raise TypeError(f"token_losses must be a floating tensor of per-token losses; got {short(token_losses)}")
    seq_ids = _integers(seq_ids, "seq_ids")
    flat, ids = token_losses.reshape(-1), seq_ids.reshape(-1)
    if flat.shape != ids.shape:
        raise ValueError(f"token_losses and seq_ids must have one entry per token; got {tuple(flat.shape)} and {tuple(ids.shape)}")
    if mask is not None and tuple(mask.shape) not in (tuple(token_losses.shape), tuple(seq_ids.shape)):
        # Flattening a mask of another shape would pair its entries with other rows' tokens.
        raise ValueError(f"mask must have token_losses' shape {tuple(token_losses.shape)}; got {tuple(mask.shape)}")
    weight = torch.ones_like(flat) if mask is None else mask.reshape(-1).to(flat.dtype)
    lo, hi = (int(v) for v in ids.aminmax())
    if lo < 0:
        raise ValueError(f"seq_ids must be >= 0 (sequence numbers, from sequence_ids); got {lo}")
    size = hi + 1
    sums = torch.zeros(size, dtype=flat.dtype, device=flat.device).index_add(0, ids, flat * weight)
    counts = torch.zeros(size, dtype=flat.dtype, device=flat.device).index_add(0, ids, weight)
    counted = counts > 0
    return sums / counts.clamp_min(1), counted
