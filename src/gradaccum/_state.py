"""The accumulator's state and what a step reports: small typed objects, nothing else.

No torch import: the MindSpore accumulator shares these.

``AccumulatorState`` is what ``Accumulator.state_dict()`` saves: the counters of the open
window and the partial gradients it holds. ``from_dict`` validates a saved copy as a whole
before anything is changed, so a refused load leaves the accumulator as it was.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from typing import TYPE_CHECKING, Any, Optional

from ._text import short

if TYPE_CHECKING:  # no torch at import time: gradaccum.mindspore uses this module too
    import torch


@dataclasses.dataclass
class StepReport:
    """What a window's step did (or, from :meth:`Window.finish`, is about to do).

    Attributes:
        step: windows closed so far, this one included (a skipped window counts: its
            number is taken, so logs stay one row per window).
        loss: the window's loss, item-weighted over all its micro-batches (and ranks).
        num_items: items in the window (all ranks); ``None`` when no counts were given.
        micro_batches: micro-batches backpropagated in the window (all ranks), stand-ins
            excluded.
        grad_norm: total norm of the window's gradient before clipping (0.0 when no
            parameter received a gradient).
        skipped: True when there was nothing sound to apply: the gradient was not finite,
            or no optimizer parameter received one. No update, no scheduler step.
        lr: learning rate of the first parameter group used for this update.
        splits: micro-batches split in two after an out-of-memory error in this window.
        stand_ins: zero-weight micro-batches this rank ran because it had run out (DDP/FSDP2).
        terms: with ``Accumulator(terms=...)``, each term's mean over the window (all ranks);
            ``loss`` is then their sum (a router loss term: its value over the window).
        tokens_per_expert: with a router loss term (``gradaccum.moe.RouterLoss``), its top-k
            assignments per expert in the window, all layers and ranks, by term.

    Example:
        >>> report = StepReport(step=1, loss=0.5, num_items=12.0, micro_batches=3, grad_norm=1.0, skipped=False)
        >>> print(f"step {report.step} loss {report.loss:.3f}")
        step 1 loss 0.500
    """

    step: int
    loss: float
    num_items: Optional[float]
    micro_batches: int
    grad_norm: float
    skipped: bool
    lr: Optional[float] = None
    splits: int = 0
    stand_ins: int = 0
    terms: Optional[dict[str, float]] = None
    tokens_per_expert: Optional[dict[str, list[float]]] = None


_COUNTERS = {  # field -> (accepted types, allows None)
    "optimizer_step": (numbers.Integral, False),
    "planned": (numbers.Integral, False),
    "micro_batches": (numbers.Integral, False),
    "items": (numbers.Real, False),
    "weighted": (bool, True),
    "reference": (numbers.Real, True),
    "loss_sum": (numbers.Real, False),
    "splits": (numbers.Integral, False),
    "parts": (numbers.Integral, False),
}


@dataclasses.dataclass
class AccumulatorState:
    """The accumulator's whole state: the open window's counters and held gradients.

    This is what :meth:`Accumulator.state_dict` saves (as a plain dict, see
    :meth:`to_dict`); nothing is kept on the side.

    Attributes:
        optimizer_step: windows closed so far.
        planned: micro-batches planned for the open window (0: no window open).
        micro_batches: micro-batches backpropagated in the open window.
        items: items summed over the open window's micro-batches (1 each without counts).
        weighted: whether the open window was given item counts (None: not yet known).
        reference: items per micro-batch behind the provisional weights (see
            ``gradaccum._weights``): the window's first micro-batch in one process; across
            ranks a shared value carried from window to window.
        loss_sum: sum of loss * items over the open window's micro-batches.
        splits: out-of-memory splits in the open window.
        parts: the split that ``forward_backward`` remembers (1: micro-batches whole).
        terms: with ``Accumulator(terms=...)``, per term ``[window total (all ranks), items
            given so far, loss sum so far]`` on this rank (None otherwise).
        grads: the open window's partial gradients, by index into the optimizer's
            parameters (empty between windows and in the live ``acc.state``, whose
            gradients live where the gradient store keeps them).

    Example:
        >>> s = AccumulatorState(optimizer_step=12, planned=4, micro_batches=3, items=96.0)
        >>> AccumulatorState.from_dict(s.to_dict(), num_params=2).micro_batches
        3
    """

    optimizer_step: int = 0
    planned: int = 0
    micro_batches: int = 0
    # Numbers, or float64 tensors on the device path (read once, at the step).
    items: Any = 0.0
    weighted: Optional[bool] = None
    reference: Optional[Any] = None
    loss_sum: Any = 0.0
    splits: int = 0
    parts: int = 1
    terms: Optional[dict[str, list[float]]] = None
    grads: dict[int, "torch.Tensor"] = dataclasses.field(default_factory=dict)

    def close_window(self) -> None:
        """Forget the open window, keep the counters that outlive it."""
        self.planned = self.micro_batches = self.splits = 0
        self.items, self.weighted, self.loss_sum = 0.0, None, 0.0
        self.terms, self.grads = None, {}

    def to_dict(self) -> dict[str, Any]:
        """A plain dict for ``torch.save``: ``{"state": counters, "grads": {i: tensor}}``."""
        counters = {name: getattr(self, name) for name in _COUNTERS}
        if self.terms is not None:
            counters["terms"] = {name: list(v) for name, v in self.terms.items()}
        return {"state": counters, "grads": dict(self.grads)}

    @classmethod
    def from_dict(cls, saved: Any, num_params: int,
                  shapes: Optional[list] = None) -> "AccumulatorState":
        """Validate ``saved`` (from :meth:`to_dict`) as a whole and build the state.

        Raises ``TypeError`` or ``ValueError`` naming the first thing that is wrong.
        """
        if not isinstance(saved, dict):
            raise TypeError(f"an Accumulator state_dict is a dict; got {type(saved).__name__}")
        extra = set(saved) - {"state", "grads", "scaler"}
        counters = saved.get("state")
        if extra or not isinstance(counters, dict):
            raise ValueError(
                "not an Accumulator state_dict: it needs a 'state' dict of counters"
                + (f" and has unknown keys {short(sorted(map(str, extra)))}" if extra else "")
            )
        unknown = set(counters) - set(_COUNTERS) - {"terms"}
        if unknown:
            raise ValueError(f"not an Accumulator state_dict (unknown fields: {short(sorted(map(str, unknown)))})")
        values: dict[str, Any] = {}
        for name, (kind, nullable) in _COUNTERS.items():
            if name not in counters:
                continue  # older checkpoints lack newer fields: their defaults hold
            v: Any = counters[name]
            if v is None and nullable:
                values[name] = v
                continue
            if (isinstance(v, bool) and kind is not bool) or not isinstance(v, kind):
                raise TypeError(f"state field {name!r} must be {kind.__name__}; got {short(v)}")
            number = typing.cast(float, v)  # a Real, checked above
            if kind is not bool and (not math.isfinite(number) or number < 0):
                raise ValueError(f"state field {name!r} must be finite and >= 0; got {short(v)}")
            values[name] = v
        state = cls(**values, terms=_terms(counters.get("terms")))
        if state.micro_batches > state.planned or state.parts < 1 or (state.reference is not None and state.reference <= 0):
            raise ValueError(
                f"inconsistent Accumulator state: micro_batches={state.micro_batches}, planned={state.planned}, "
                f"parts={state.parts}, reference={state.reference}"
            )
        grads = saved.get("grads", {})
        if not isinstance(grads, dict):
            raise TypeError(f"'grads' must be a dict of parameter index -> tensor; got {type(grads).__name__}")
        for key, g in grads.items():
            i = _index(key, num_params)
            if not (hasattr(g, "shape") and hasattr(g, "dtype") and hasattr(g, "to")):
                raise TypeError(f"saved gradient {i} must be a tensor; got {type(g).__name__}")
            if shapes is not None and tuple(g.shape) != tuple(shapes[i]):
                raise ValueError(
                    f"saved gradient {i} has shape {tuple(g.shape)} but parameter {i} has {tuple(shapes[i])}: "
                    "this state belongs to another model or optimizer"
                )
            state.grads[i] = g
        if state.grads and state.micro_batches == 0:
            raise ValueError("the state holds gradients but no micro-batch of an open window")
        return state


def _terms(saved: Any) -> Optional[dict[str, list[float]]]:
    if saved is None:
        return None
    ok = isinstance(saved, dict) and all(
        isinstance(k, str) and isinstance(v, (list, tuple)) and len(v) == 3
        and all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        and v[0] >= 0 and v[1] >= 0 for k, v in saved.items())
    if not ok:
        raise ValueError(
            "state field 'terms' must map term names to [window total, items so far, loss sum so far], "
            f"finite numbers with the counts >= 0; got {short(saved)}")
    return {k: [float(x) for x in v] for k, v in saved.items()}


def _index(key: Any, num_params: int) -> int:
    if isinstance(key, bool) or not isinstance(key, (numbers.Integral, str)):
        raise TypeError(f"gradient keys are parameter indices; got {short(key)}")
    try:
        i = int(key)
    except ValueError:
        raise TypeError(f"gradient keys are parameter indices; got {short(key)}") from None
    if not 0 <= i < num_params:
        raise ValueError(
            f"saved gradient index {i} is outside this optimizer's {num_params} parameters: "
            "the state belongs to another model or optimizer"
        )
    return i
