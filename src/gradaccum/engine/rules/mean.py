"""A mean over items: the default rule.

The loss of micro-batch i is a mean over its n_i items. Backpropagated with the provisional
weight n_i / D (D = reference x planned micro-batches), the held gradient is a sum over
items (the mean of means is not the mean); the step's boundary scale D / N, N being the
window's items over all ranks, makes it the mean (``gradaccum._weights``). In one process
the window's first micro-batch sets the reference, so a window of equal micro-batches needs
no rescaling; across ranks the reference is the last window's items per micro-batch, the
same on every rank, because DDP averages before the total is known.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import torch

from ... import _weights
from ..counts import HostCounts
from .base import Rule, add_nothing, check_autocast, first_mean, check_loss, one_term, shared_reference, weighted_backward

if TYPE_CHECKING:
    from ..._state import AccumulatorState
    from ..packet import Packet
    from ..parts import Parts, WindowState

# Builds the rule that serves a window whose first backward brings several terms (``build``).
Several = Callable[["Parts", "WindowState", Mapping[str, Any]], Rule]


class Mean(Rule):
    """Each micro-batch weighs its items; the denominator is fixed when the window closes."""

    name = "mean over items"
    fields = (("items", 1), ("loss_sum", 1), ("invalid", 1))

    def __init__(self, counts: HostCounts, several: Optional[Several] = None):
        self.counts = counts
        self.several = several
        # The open window's form: a plain loss, or one-term mappings of this name.
        self.plain: bool = False
        self.term: Optional[str] = None

    def for_loss(self, acc: "Parts", window: "WindowState", loss: Any) -> Rule:
        if type(loss) is torch.Tensor:  # the common case first: an isinstance on Mapping costs microseconds
            return self
        # Several terms, or a second term's one-term mapping in the window: no one denominator.
        if isinstance(loss, Mapping) and self.several is not None and (
                len(loss) > 1 or (self.term is not None and next(iter(loss), self.term) != self.term)):
            return self.several(acc, window, loss)
        return self

    def backward(self, acc: "Parts", window: "WindowState", loss: Any, num_items: Any, batch: Any) -> None:
        if type(loss) is torch.Tensor:
            self.plain = True
        elif isinstance(loss, Mapping):
            self.term = next(iter(loss))
            loss, num_items = one_term(loss, num_items)  # one denominator: the boundary scale fixes it
        else:
            self.plain = True
        loss = check_loss(loss)
        if acc.autocast_dtype is not None:
            check_autocast(acc, 5)  # pointing at the caller of window.backward
        self.add(acc, loss, num_items)

    def add(self, acc: "Parts", loss: torch.Tensor, num_items: Any) -> None:
        """Backpropagate a checked mean ``loss`` with its provisional weight and count it."""
        st = acc.state
        n, weighted = self.counts.items(num_items)
        if st.reference is None or st.micro_batches == 0:
            self.reference(acc, n)
        assert st.reference is not None
        weighted_backward(acc, loss, _weights.provisional_weight(n, st.reference, st.planned))
        st.weighted = weighted
        st.micro_batches += 1
        self.counts.record(loss, n)

    def reference(self, acc: "Parts", n: Any) -> None:
        """Set the window's reference at its first weighed micro-batch (a collective across ranks)."""
        st = acc.state
        if st.micro_batches == 0 and acc.parallel.world == 1:
            # One process: the window's first micro-batch sets the scale, so a window of one
            # micro-batch is exactly the plain step and equal full windows need no rescaling.
            st.reference = n
        elif st.reference is None:
            # Across ranks the weights must share one reference: the mean of the ranks' first
            # micro-batches, once; later windows reuse the last window's global mean.
            st.reference = shared_reference(acc, n)

    def stand_in(self, acc: "Parts", window: "WindowState", loss: Any) -> None:
        if acc.state.reference is None:  # the other ranks make this all-reduce in their first backward
            acc.state.reference = shared_reference(acc, torch.zeros((), device=acc.device) if self.counts.on_device else 0.0)
        add_nothing(acc, first_mean(loss))
        window.stand_ins += 1

    def sums(self, acc: "Parts") -> Any:
        return self.counts.values()

    def scale(self, acc: "Parts", packet: "Packet") -> Any:
        st = acc.state
        assert st.reference is not None  # set by the window's first backward (or stand-in)
        items = packet["items"][0]
        # Held: sum_i n_i * g_i / D. Times D / N (and the ranks DDP/FSDP average over) = the mean.
        if isinstance(items, torch.Tensor):  # on the device: never read here
            return _weights.boundary_scale(items, st.reference, st.planned, acc.parallel.world).to(torch.float32)
        return _weights.boundary_scale(items, st.reference, st.planned, acc.parallel.world) if items else 1.0

    def check(self, read: dict[str, list[float]]) -> None:
        if read["invalid"][0]:
            raise ValueError(
                "num_items must be > 0 and finite for every micro-batch (the tokens or samples that the "
                "loss averages over); a tensor count in this window was not. Skip a micro-batch with no "
                "items instead of backpropagating it. This window is not applied"
            )

    def report(self, acc: "Parts", read: dict[str, list[float]]) -> dict[str, Any]:
        items, loss_sum = read["items"][0], read["loss_sum"][0]
        return {"loss": loss_sum / items if items else math.nan,
                "num_items": items if acc.state.weighted is not False else None}

    def close(self, acc: "Parts", read: dict[str, list[float]]) -> None:
        micro_batches = read["micro_batches"][0]
        # Across ranks the next window reuses this window's global items per micro-batch: the
        # same number on every rank, and a boundary scale of 1 for a window like this one.
        acc.state.reference = read["items"][0] / micro_batches if acc.parallel.world > 1 and micro_batches else None
        self.clear()

    def clear(self) -> None:
        self.counts.reset()
        self.plain, self.term = False, None

    def save(self, acc: "Parts", saved: "AccumulatorState") -> None:
        saved.items, saved.loss_sum = self.counts.settle()

    def check_load(self, acc: "Parts", new: "AccumulatorState") -> None:
        if new.terms is not None and new.micro_batches:
            raise ValueError("the saved open window was accumulated with terms=..., and this Accumulator is built "
                             "without them: build it as the checkpointed one was")

    def load(self, acc: "Parts", new: "AccumulatorState") -> None:
        self.counts.load(new.items, new.loss_sum)
