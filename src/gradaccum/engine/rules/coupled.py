"""A window of cached representations (``window.encode`` / ``backward_encoded``): one loss
over the whole window, so nothing is weighed per micro-batch.

The loss couples every item of the window (and of every rank, through ``window.gather``),
so it is already the big batch's loss: the gradient needs no denominator. Only the ranks
remain. Every rank computes the same loss; the loss's own parameters (a learnable
temperature) get its full gradient on every rank, and the encoder's gradient comes from
each rank's own representations, a slice of it. Seeding the loss with 1 / world and the
representations' gradients with world makes both come out right after the boundary scale
(world) and the data-parallel average.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .base import Rule

if TYPE_CHECKING:
    from ..._state import AccumulatorState
    from ..packet import Packet
    from ..parts import Parts, WindowState


class Coupled(Rule):
    """The weights of a cached window: a seed for the loss, a factor for the representations."""

    name = "cached representations"
    fields = (("loss_sum", 1),)

    def __init__(self) -> None:
        self.loss: Any = 0.0

    @staticmethod
    def loss_seed(world: int) -> float:
        """What ``backward_encoded``'s loss is seeded with on each rank."""
        return 1.0 / world

    @staticmethod
    def representation_factor(world: int) -> float:
        """What the representations' gradients are multiplied by before the re-encoding pass."""
        return float(world)

    def record(self, acc: "Parts", loss: torch.Tensor) -> None:
        """The window's loss (the same on every rank: each contributes 1 / world of it)."""
        acc.state.weighted = False
        self.loss = loss.detach().reshape(1).to(torch.float64) / acc.parallel.world

    def backward(self, acc: "Parts", window: "WindowState", loss: Any, num_items: Any, batch: Any) -> None:
        raise RuntimeError(
            "window.backward() in a window that used window.encode(): a window either caches "
            "representations (encode + backward_encoded) or backpropagates micro-batch losses, not both")

    def sums(self, acc: "Parts") -> Any:
        return self.loss.clone() if isinstance(self.loss, torch.Tensor) else [float(self.loss)]

    def scale(self, acc: "Parts", packet: "Packet") -> Any:
        return float(acc.parallel.world)

    def report(self, acc: "Parts", read: dict[str, list[float]]) -> dict[str, Any]:
        loss = read["loss_sum"][0]
        return {"loss": loss if math.isfinite(loss) else math.nan, "num_items": None}

    def close(self, acc: "Parts", read: dict[str, list[float]]) -> None:
        self.loss = 0.0

    def clear(self) -> None:
        self.loss = 0.0

    def save(self, acc: "Parts", saved: "AccumulatorState") -> None:
        if acc.state.micro_batches or acc.state.planned:
            raise RuntimeError(
                "state_dict() inside a window of window.encode(): the cached representations cannot be saved. "
                "Save at a window boundary (after window.step())")
