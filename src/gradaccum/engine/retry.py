"""A micro-batch that survives out-of-memory errors: discard the attempt, split, retry.

Used in one process and under DDP, where every gradient an attempt wrote is in ``.grad`` or
in a gradient store, and no collective runs during the attempt (the engine runs every
piece without gradient sync and, under DDP, reduces the window itself at the step). An
error in the window's last micro-batch is therefore as recoverable as in any other.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import split as _split
from .parts import Parts, WindowState



def forward_backward_with_retry(acc: Parts, window: WindowState, batch: Any, loss_fn: Callable,
                                run: Callable) -> None:
    """``run(acc, window, piece, loss_fn)`` for ``batch``, split in two on each OOM and retried."""
    st = acc.state
    if acc.parallel.world > 1 and not window.explicit_reduce:
        window.explicit_reduce = True  # a retried attempt must not have synchronised
    total = _split.batch_size(batch) or 1
    parts = min(st.parts, total)
    pieces = _split.split_batch(batch, parts) if parts > 1 else [batch]
    while pieces:
        piece = pieces.pop(0)
        try:
            _attempt(acc, window, piece, loss_fn, run)
        except torch.OutOfMemoryError as exc:
            n = _split.batch_size(piece)
            if n is None or n <= 1:
                raise torch.OutOfMemoryError(
                    f"out of memory on a micro-batch of {n} item(s), which cannot be split further: "
                    "the model alone does not fit; free memory or shard the model"
                ) from exc
            pieces[:0] = _split.split_batch(piece, 2)
            st.splits += 1
            st.parts = max(st.parts, -(-total // ((n + 1) // 2)))
            if acc.device.type == "cuda":
                torch.cuda.empty_cache()


def _attempt(acc: Parts, window: WindowState, piece: Any, loss_fn: Callable, run: Callable) -> None:
    # Hold the gradients so far aside: the attempt writes fresh ones, which are kept only if
    # it finishes (an OOM in backward may have written some parameters already).
    rule = window.rule
    held, held_by_rule = acc.stores.take(), rule.take()
    try:
        with acc.skip_sync():
            run(acc, window, piece, loss_fn)
    except BaseException:
        acc.stores.put_back(held)
        rule.put_back(held_by_rule)
        if window.rule is not rule:  # a rule that took the window over in this attempt starts afresh
            acc.rule = window.rule = rule
        raise
    acc.stores.merge(held)
    if window.rule is rule:
        rule.merge(held_by_rule)
