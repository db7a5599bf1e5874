"""The accumulator's state and what a step reports: small typed objects, nothing else."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass
class StepReport:
    """What :meth:`Window.step` did.

    Attributes:
        step: windows closed so far, this one included (a skipped window counts: its
            number is taken, so logs stay one row per window).
        loss: the window's loss, item-weighted over all its micro-batches (and ranks).
        num_items: items in the window (all ranks); ``None`` when no counts were given.
        micro_batches: micro-batches backpropagated in the window (all ranks).
        grad_norm: total norm of the window's gradient before clipping.
        skipped: True when the gradient was not finite: no update, no scheduler step.
        lr: learning rate of the first parameter group used for this update.
        splits: micro-batches split in two after an out-of-memory error in this window.

    Example:
        >>> report = window.step()  # doctest: +SKIP
        >>> print(f"step {report.step} loss {report.loss:.3f}")  # doctest: +SKIP
    """

    step: int
    loss: float
    num_items: Optional[float]
    micro_batches: int
    grad_norm: float
    skipped: bool
    lr: Optional[float] = None
    splits: int = 0


@dataclasses.dataclass
class AccumulatorState:
    """The accumulator's whole state, small enough to log and checkpoint.

    Attributes:
        optimizer_step: windows closed so far.
        planned: micro-batches planned for the open window (0: no window open).
        micro_batches: micro-batches backpropagated in the open window.
        items: items summed over the open window's micro-batches (1 each without counts).
        weighted: whether the open window was given item counts (None: not yet known).
        reference: items per micro-batch behind the provisional weights (see ``_weights``):
            the window's first micro-batch in one process; across ranks a shared value
            carried from window to window.
        splits: out-of-memory splits in the open window (see ``Window.forward_backward``).
        loss_sum: sum of loss * items over the open window's micro-batches (on an
            accelerator the running window's losses are kept as tensors and read at the
            step, so that no micro-batch waits for the device).

    Example:
        >>> acc.state.optimizer_step, acc.state.micro_batches  # doctest: +SKIP
        (12, 3)
    """

    optimizer_step: int = 0
    planned: int = 0
    micro_batches: int = 0
    items: float = 0.0
    weighted: Optional[bool] = None
    reference: Optional[float] = None
    loss_sum: float = 0.0
    splits: int = 0

    def close_window(self) -> None:
        """Forget the open window, keep the counters that outlive it."""
        self.planned = self.micro_batches = self.splits = 0
        self.items, self.weighted, self.loss_sum = 0.0, None, 0.0
