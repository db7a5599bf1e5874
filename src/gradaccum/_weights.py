"""Pure arithmetic of a window: no torch.distributed, no I/O, testable alone.

A window's gradient must be the gradient of the mean over all its items:

    g = sum_i n_i * g_i / N,   N = sum_i n_i

where g_i is the gradient of micro-batch i's *mean* loss over its n_i items. N is only
known when the window closes, so each micro-batch is backpropagated with a provisional
weight n_i / D and the held sum is multiplied by D / N at the boundary. D is chosen as
(items of the window's first micro-batch) * (planned micro-batches), which makes the
weights close to 1/k and the boundary scale exactly 1.0 for a full window of equal
micro-batches: the common case then costs nothing beyond the plain loop.

Without item counts every micro-batch counts as one item, so the same arithmetic gives
"each micro-batch present weighs the same" (a partial window is still a mean).

Where a window's total is counted before its first backward (several terms, the Trainer's
windows), the weight is exact at once: :func:`share`. Loops that run their own backward
(Accelerate, Lightning, MindSpore) keep their counts in a :class:`Tally`. No torch import:
the MindSpore accumulator uses the same formulas.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import Any, Callable, Optional, Sequence, Union

StepsLike = Union[int, Callable[[int], int]]


def check_steps(steps: object) -> StepsLike:
    """Validate the ``steps`` argument of :class:`gradaccum.Accumulator`.

    >>> check_steps(4)
    4
    """
    if callable(steps) or callable(getattr(steps, "window_plan", None)):
        return steps  # type: ignore[return-value]
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
        raise TypeError(
            f"steps must be a positive int (micro-batches per optimizer step), a callable "
            f"optimizer_step -> int, or a sampler with window_plan() (gradaccum.data.TokenBudgetSampler); got {steps!r} of type {type(steps).__name__}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1 (micro-batches per optimizer step); got {steps}")
    return int(steps)


def resolve_steps(steps: StepsLike, optimizer_step: int) -> int:
    """The number of micro-batches planned for the window after ``optimizer_step`` steps.

    >>> resolve_steps(lambda s: 2 if s < 10 else 8, 12)
    8
    """
    if not callable(steps):
        return steps
    k = steps(optimizer_step)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(
            f"the steps callable must return a positive int for optimizer step "
            f"{optimizer_step}; it returned {k!r}"
        )
    return int(k)


def check_num_items(num_items: object) -> float:
    """Validate one micro-batch's item count and return it as a number (> 0).

    Accepts a Python number or a one-element tensor (read with ``.item()``; pass an int to
    avoid a device synchronisation).

    >>> check_num_items(17)
    17
    """
    if type(num_items) is int and num_items > 0:  # the common case, checked per micro-batch
        return num_items
    if getattr(num_items, "is_meta", False):
        raise ValueError("num_items is a meta tensor, which holds no value: give the count as a number, or a "
                         "tensor with data (the tokens or samples that the loss averages over)")
    if hasattr(num_items, "item") and getattr(num_items, "numel", lambda: 1)() == 1:
        num_items = num_items.item()  # type: ignore[union-attr]
    if isinstance(num_items, bool) or not isinstance(num_items, numbers.Real):
        raise ValueError(
            f"num_items must be a positive number of tokens or samples that the loss "
            f"averages over; got {num_items!r}"
        )
    if not math.isfinite(num_items) or num_items <= 0:
        raise ValueError(
            f"num_items must be > 0 (the tokens or samples that the loss averages over); got "
            f"{num_items!r}. Skip a micro-batch with no items instead of backpropagating it."
        )
    return typing.cast(float, num_items)  # an int or a float, as given


def micro_batch_items(num_items: object, window_weighted: Optional[bool]) -> tuple[float, bool]:
    """One micro-batch's item count, and whether it is item-weighted.

    Without a count a micro-batch counts as one item; a window may not mix the two.

    >>> micro_batch_items(12, None)
    (12, True)
    >>> micro_batch_items(None, False)
    (1, False)
    """
    weighted = num_items is not None
    if window_weighted is not None and window_weighted != weighted:
        raise ValueError(
            "num_items was given for some micro-batches of this window and not for others: "
            "give it for every micro-batch (item-weighted) or for none (each weighs the same)"
        )
    return (check_num_items(num_items) if weighted else 1), weighted


def provisional_weight(num_items: Any, reference: Any, planned: int) -> Any:
    """Weight of one micro-batch's mean loss before the window's total is known.

    >>> provisional_weight(30, reference=30, planned=4)
    0.25
    """
    return num_items / (reference * planned)


def boundary_scale(total_items: Any, reference: float, planned: int, world_size: int = 1) -> Any:
    """Factor that turns the held sum of provisionally weighted gradients into the mean.

    ``world_size`` undoes the averaging over ranks that DDP and FSDP apply when they
    reduce gradients, since the item total is already global. ``total_items`` may be a
    device tensor (the result is one too, never read here).

    >>> boundary_scale(total_items=120, reference=30, planned=4)
    1.0
    >>> boundary_scale(total_items=60, reference=30, planned=4)  # a half-full last window
    2.0
    """
    return reference * planned * world_size / total_items


def share(num_items: Any, total_items: Any, world_size: int = 1) -> Any:
    """The exact weight of a micro-batch whose window total was counted before its backward:
    its share of the window's items, times the ranks that the gradient is averaged over.

    >>> share(10, total_items=40, world_size=2)
    0.5
    """
    return num_items * world_size / total_items


class Closed(typing.NamedTuple):
    """What :meth:`Tally.close` found: the factor for the held gradient, the window's items
    and its item-weighted mean loss (all ranks; 0.0 when no loss was added)."""

    factor: float
    items: float
    loss: float


@dataclasses.dataclass
class Tally:
    """One window's counts for a loop that runs its own backward (Accelerate, Lightning,
    MindSpore): micro-batch i is backpropagated with ``add()``'s provisional weight
    n_i / (reference * planned); when the window closes, the caller sums ``local()`` over
    its ranks in its own collective and multiplies the held gradient by ``close()``'s factor.
    ``reference`` is the same on every rank (the last window's global items per micro-batch),
    so ranks that average gradients before the total is known agree.

    Attributes:
        planned: micro-batches per window, the same on every rank.
        reference: items per micro-batch behind the provisional weights.
        items, micro_batches, loss_sum: this rank's open window (``loss_sum`` may be a tensor).
        weighted: whether the open window has item counts (None: no micro-batch yet).

    Example:
        >>> t = Tally()
        >>> [t.add(n, loss=0.5) for n in (3, 1)]
        [3.0, 1.0]
        >>> t.close(t.local())
        Closed(factor=0.25, items=4.0, loss=0.5)
        >>> t.reference  # the next window's weights are n / 2
        2.0
    """

    planned: int = 1
    reference: float = 1.0
    items: float = 0.0
    micro_batches: int = 0
    loss_sum: Any = 0.0
    weighted: Optional[bool] = None

    def add(self, num_items: object = None, loss: Any = None) -> float:
        """Count one micro-batch (``num_items`` as ``Window.backward`` takes it, and its
        mean ``loss``, kept as given: a tensor stays unread); return its provisional weight."""
        n, self.weighted = micro_batch_items(num_items, self.weighted)
        self.items += n
        self.micro_batches += 1
        if loss is not None:
            self.loss_sum = self.loss_sum + loss * n
        return float(provisional_weight(n, self.reference, self.planned))

    def local(self) -> list:
        """``[items, micro_batches, loss_sum]`` of this rank, to be summed over ranks."""
        return [float(self.items), float(self.micro_batches), self.loss_sum]

    def close(self, summed: Sequence[Any], world_size: int = 1) -> Closed:
        """The window's factor from ``local()`` summed over ranks; the tally starts the next window."""
        items, micro_batches, loss_sum = (float(v) for v in summed)
        if items <= 0 or micro_batches <= 0:
            raise ValueError("a window closed without a micro-batch: add() each micro-batch before closing it")
        factor = float(boundary_scale(items, self.reference, self.planned, world_size))
        loss = loss_sum / items
        self.reference = items / micro_batches
        self.items, self.micro_batches, self.loss_sum, self.weighted = 0.0, 0, 0.0, None
        return Closed(factor, items, loss)

    def state_dict(self) -> dict[str, Any]:
        """The tally as plain numbers (a tensor loss sum is read).

        >>> Tally(reference=3.0).state_dict()["reference"]
        3.0
        """
        loss = self.loss_sum.item() if hasattr(self.loss_sum, "item") else float(self.loss_sum)
        return {"planned": self.planned, "reference": self.reference, "items": float(self.items),
                "micro_batches": self.micro_batches, "loss_sum": loss, "weighted": self.weighted}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (an older one holding only ``reference`` is accepted)."""
        reference = state.get("reference", 1.0)
        if isinstance(reference, bool) or not isinstance(reference, numbers.Real) or not float(reference) > 0:
            raise ValueError(f"a tally's reference must be a positive number; got {reference!r}")
        self.reference = float(reference)
        self.planned = int(state.get("planned", self.planned))
        self.items = float(state.get("items", 0.0))
        self.micro_batches = int(state.get("micro_batches", 0))
        self.loss_sum = float(state.get("loss_sum", 0.0))
        self.weighted = state.get("weighted")
