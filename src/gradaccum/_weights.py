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
"""

from __future__ import annotations

import math
import typing
import numbers
from typing import Callable, Optional, Union

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


def provisional_weight(num_items: float, reference: float, planned: int) -> float:
    """Weight of one micro-batch's mean loss before the window's total is known.

    >>> provisional_weight(30, reference=30, planned=4)
    0.25
    """
    return num_items / (reference * planned)


def boundary_scale(total_items: float, reference: float, planned: int, world_size: int = 1) -> float:
    """Factor that turns the held sum of provisionally weighted gradients into the mean.

    ``world_size`` undoes the averaging over ranks that DDP and FSDP apply when they
    reduce gradients, since the item total is already global.

    >>> boundary_scale(total_items=120, reference=30, planned=4)
    1.0
    >>> boundary_scale(total_items=60, reference=30, planned=4)  # a half-full last window
    2.0
    """
    return reference * planned * world_size / total_items
