"""One micro-batch: handed to the window's rule (``engine/rules``), which weighs it; a
forward and backward that survive out-of-memory errors.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from . import split as _split
from .retry import forward_backward_with_retry
from .parts import Parts, WindowState
from .rules.base import add_nothing, first_mean


def micro_batch(acc: Parts, window: WindowState, loss: Any, num_items: Any, batch: Any = None) -> None:
    """Backpropagate one micro-batch's ``loss`` (a mean, or a mapping of terms) as the
    window's rule weighs it; a stand-in runs a zero-weight backward."""
    acc.check_current(window)
    rule = window.rule.for_loss(acc, window, loss)
    if window.is_stand_in:
        rule.stand_in(acc, window, loss)
    else:
        rule.backward(acc, window, loss, num_items, batch)


def forward_backward(acc: Parts, window: WindowState, batch: Any, loss_fn: Callable) -> None:
    """See :meth:`Window.forward_backward`."""
    acc.check_current(window)
    done = acc.state.micro_batches
    if not acc.parallel.can_roll_back_oom:
        _without_retry(acc, window, batch, loss_fn)
    else:
        forward_backward_with_retry(acc, window, batch, loss_fn, run_piece)
    acc.state.micro_batches = done + (0 if window.is_stand_in else 1)  # the pieces are one micro-batch


def run_piece(acc: Parts, window: WindowState, piece: Any, loss_fn: Callable, zero: bool = False) -> None:
    with window.autocast():
        out = loss_fn(piece)
    if isinstance(out, Mapping):
        if zero:
            add_nothing(acc, first_mean(out))
        else:
            micro_batch(acc, window, out, None, piece)
        return
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"loss_fn must return (loss, num_items): the micro-batch's mean loss as a scalar tensor and "
            f"the items it averages over (or None); it returned {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
        )
    if zero:  # a stand-in piece
        add_nothing(acc, out[0])
        return
    micro_batch(acc, window, out[0], out[1])


def _without_retry(acc: Parts, window: WindowState, batch: Any, loss_fn: Callable) -> None:
    """FSDP2: run the remembered split, never retry; announce an OOM so that ranks blocked in
    a collective stop too, and say which split to restart with (``error.parts``)."""
    acc.parallel.watch_for_oom()
    total = _split.batch_size(batch) or 1
    parts = acc.state.parts
    pieces = _split.split_batch(batch, min(parts, total)) if parts > 1 else [batch]
    # Every rank must run as many forwards (each gathers): a micro-batch with fewer items
    # than the split repeats its last piece at weight zero.
    pieces += [None] * (parts - len(pieces))
    piece = batch
    try:
        for i, piece in enumerate(pieces):
            zero = piece is None
            piece = pieces[i - 1] if zero else piece
            # Only the final piece of the window's last micro-batch may synchronise. Other
            # micro-batches already run inside the window's no-sync switch, which FSDP2
            # does not nest, so pieces enter it only in the last micro-batch.
            if window._last and i < len(pieces) - 1:
                with acc.skip_sync():
                    run_piece(acc, window, piece, loss_fn, zero)
            else:
                run_piece(acc, window, piece, loss_fn, zero)
    except torch.OutOfMemoryError as exc:
        n = _split.batch_size(piece) or 1
        suggestion = max(parts + 1, -(-total // max(1, (n + 1) // 2)))
        message = (
            f"out of memory on rank {acc.parallel.rank} in a micro-batch of {n} item(s) under "
            f"{acc.parallel.name}, which gathers and reduces inside forward and backward, so the attempt "
            "cannot be undone on one rank alone. Resume from the last checkpoint with a smaller "
            f"micro-batch, or split each in {suggestion} (acc.state.parts = {suggestion}; gradaccum train: "
            "--micro-batch; torchrun: a restart budget)"
        )
        acc.parallel.announce_oom(message)
        error = torch.OutOfMemoryError(message)
        error.parts = suggestion  # type: ignore[attr-defined]
        raise error from exc
