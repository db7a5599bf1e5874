"""What every normalisation rule answers, and the backward helpers they share."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

from ..packet import Layout

if TYPE_CHECKING:
    from ..._state import AccumulatorState
    from ..packet import Packet
    from ..parts import Parts, WindowState


class Rule:
    """One way of weighing a window's micro-batches and fixing its denominator.

    A rule is chosen once, when the ``Accumulator`` is built (or, for a window of cached
    representations, when the window's first ``encode`` comes), and owns, for its windows:

    - ``backward``: one micro-batch's loss backpropagated with its weight (``stand_in``: a
      zero-weight one that only pairs collectives);
    - ``fields``: its sums in the step's one collective (this rank's, by ``sums``), and
      ``ahead_fields``: what it counts of the next window before its first backward
      (``count_ahead``, summed over ranks in the same collective, handed back by ``open``);
    - ``scale``: the boundary scale from the summed fields, before anything is read, and
      ``finalize``: anything it adds to ``.grad`` after that;
    - ``check`` and ``report``: its errors and its ``StepReport`` fields, from the read;
    - ``close``: what the next window inherits; ``save``/``check_load``/``load``: its part
      of ``AccumulatorState``.
    """

    name = "rule"
    fields: Layout = ()
    ahead_fields: Layout = ()

    # -- counted ahead ------------------------------------------------------------------

    def count_ahead(self, batches: list[Any]) -> list[float]:
        """This rank's ``ahead_fields`` for a window's micro-batches (before its first backward)."""
        return []

    def open(self, totals: list[float]) -> None:
        """The ``ahead_fields`` of the window that opens, summed over ranks."""

    def open_window(self, acc: "Parts", batches: list[Any], target: int) -> None:
        """The window opens with this rank's ``batches`` (``target`` micro-batches on every rank,
        stand-ins included), after the previous update: what can only be counted with the
        current weights is counted here (a router's assignments)."""

    def before_micro_batch(self, batch: Any) -> None:
        """A micro-batch is about to be handed out (its forward follows)."""

    # -- each micro-batch ----------------------------------------------------------------

    def for_loss(self, acc: "Parts", window: "WindowState", loss: Any) -> "Rule":
        """The rule that serves this loss: itself, unless a loss it cannot weigh hands the
        window over (the mean rule, given several terms without counters)."""
        return self

    def backward(self, acc: "Parts", window: "WindowState", loss: Any, num_items: Any, batch: Any) -> None:
        raise NotImplementedError

    def stand_in(self, acc: "Parts", window: "WindowState", loss: Any) -> None:
        """A rank that ran out repeats its last micro-batch at weight zero."""
        add_nothing(acc, first_mean(loss))
        window.stand_ins += 1

    # -- the step ---------------------------------------------------------------------

    def sums(self, acc: "Parts") -> Any:
        """This rank's ``fields``: a list of numbers, or a float64 tensor on the device."""
        return []

    def scale(self, acc: "Parts", packet: "Packet") -> Any:
        """The factor for the held gradient (a device tensor is fine: nothing is read)."""
        raise NotImplementedError

    def finalize(self, acc: "Parts", packet: "Packet") -> None:
        """After the boundary scale reached ``.grad``: add what the rule held elsewhere."""

    def check(self, read: dict[str, list[float]]) -> None:
        """Raise ``ValueError`` when the window's numbers say it must not be applied."""

    def report(self, acc: "Parts", read: dict[str, list[float]]) -> dict[str, Any]:
        """``StepReport`` fields: ``loss``, ``num_items``, ``terms``."""
        raise NotImplementedError

    def close(self, acc: "Parts", read: dict[str, list[float]]) -> None:
        """The window is done: what the next one inherits."""

    def clear(self) -> None:
        """Forget the open window (after an error at its step)."""

    # -- an out-of-memory retry (see retry.py): what the rule holds besides the stores ---

    def take(self) -> Any:
        return None

    def put_back(self, held: Any) -> None:
        pass

    def merge(self, held: Any) -> None:
        pass

    # -- checkpoints ----------------------------------------------------------------------

    def save(self, acc: "Parts", saved: "AccumulatorState") -> None:
        """Write the rule's part of a mid-window state (``acc.state`` is already copied)."""

    def check_load(self, acc: "Parts", new: "AccumulatorState") -> None:
        """Refuse, before anything changes, a state this rule cannot continue."""

    def load(self, acc: "Parts", new: "AccumulatorState") -> None:
        """Take the rule's part of a validated state."""


def first_mean(loss: Any) -> torch.Tensor:
    """The loss tensor of a plain call, or the first term's mean of a mapping."""
    if isinstance(loss, Mapping):
        value = next(iter(loss.values()))
        return value[0] if isinstance(value, (tuple, list)) else value
    return loss


def check_autocast(acc: "Parts", stacklevel: int) -> None:
    if acc.autocast_dtype is not None and not acc.autocast_used and not acc.warned_autocast:
        acc.warned_autocast = True
        warnings.warn(f"precision={acc.precision!r} but the forward ran outside window.autocast(): "
                      "wrap the forward in `with window.autocast():` (backward stays outside)", stacklevel=stacklevel)


def seed(acc: "Parts", weight: Any, loss: torch.Tensor) -> torch.Tensor:
    """The weight as a tensor like ``loss``; kept while it repeats (equal micro-batches)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype=loss.dtype, device=loss.device).reshape(())
    last = acc._last_seed
    if last is None or acc._last_weight != weight or last.dtype != loss.dtype or last.device != loss.device:
        last = acc._last_seed = torch.full((), weight, dtype=loss.dtype, device=loss.device)
        acc._last_weight = weight
    return last


def weighted_backward(acc: "Parts", loss: torch.Tensor, weight: Any) -> None:
    """Backpropagate ``loss * weight`` through the scaler or the data-parallel adapter, then
    let the stores take what arrived."""
    if acc.scaler is not None:
        acc.scaler.scale(loss * weight).backward()
    else:
        # A tensor subclass (DTensor) wants its own kind of seed: it gets the plain weight.
        acc.parallel.backward(loss, seed(acc, weight, loss) if type(loss) is torch.Tensor else weight)
    acc.stores.absorb()


def add_nothing(acc: "Parts", loss: torch.Tensor) -> None:
    """A zero-weight backward: its collectives pair with the other ranks', it adds nothing."""
    acc.parallel.backward(loss.reshape(()), 0.0)
    acc.stores.absorb()


def shared_reference(acc: "Parts", n: Any) -> Any:
    """The mean over ranks of ``n``: a reference every rank's weights can share (a collective)."""
    if isinstance(n, torch.Tensor):
        return acc.parallel.all_sum(n.reshape(1).to(torch.float64))[0] / acc.parallel.world
    return acc.parallel.all_sum([n])[0] / acc.parallel.world


def check_loss(loss: Any) -> torch.Tensor:
    """A micro-batch's mean loss: a scalar tensor that requires grad."""
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss must be a scalar tensor (the mean over the micro-batch's items); got {shape}. "
            "Reduce it with .mean() or .sum() / num_items first."
        )
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: compute it from the model's output, outside torch.no_grad()")
    return loss.reshape(()) if loss.dim() else loss


def one_term(mapping: Mapping[str, Any], num_items: Any) -> tuple[Any, Any]:
    """The ``(mean, num_items)`` of a mapping with one term (the plain call)."""
    ((name, value),) = mapping.items()
    if num_items is not None:
        raise ValueError("num_items with a mapping of terms: give each term's count inside it, {name: (mean, n)}")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ValueError(
        f"term {name!r} without its num_items: give {{{name!r}: (mean, num_items)}}, or count it ahead with "
        f"Accumulator(terms={{{name!r}: counter}})")


def no_num_items(num_items: Optional[Any]) -> None:
    if num_items is not None:
        raise ValueError("num_items with a mapping of terms: give each term's count inside it, {name: (mean, n)}")
