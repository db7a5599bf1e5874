"""What the engine's parts share: the accumulator's parts (``Parts``) and one window's
state (``WindowState``). The public ``Accumulator`` and ``Window`` add the loop and the calls
on top; the parts (``backward``, ``step``, ``encoded``, ``retry``, ``checkpoint``) import
only this module, so no part reaches back into the loop that calls it.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Optional

import torch

from .. import _weights
from ..nn import WindowBatchNorm
from . import parallel as _parallel
from .grads import Stores
from .plan import Planner, agree
from .._state import AccumulatorState, StepReport

if TYPE_CHECKING:  # the rules receive the parts they act on; the parts only hold them
    from .rules import Coupled, Rule


class Parts:
    """The parts an Accumulator is made of (attributes set by ``build.build_parts``), and the
    few calls every part may make on them. The engine's modules receive this, never the
    public ``Accumulator``, so none of them imports the loop that imports them."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    steps: _weights.StepsLike
    max_grad_norm: Optional[float]
    precision: str
    accum_dtype: Optional[torch.dtype]
    params: list[torch.Tensor]
    param_groups_by_mesh: list[list[torch.Tensor]]  # one list unless parameters lie on several device meshes
    device: torch.device
    parallel: _parallel.SingleProcess
    stores: Stores
    rule: Rule  # the normalisation rule of the accumulator's windows (see engine/rules)
    coupled: Coupled  # ... and of a window of cached representations
    planner: Planner
    state: AccumulatorState
    scaler: Optional[torch.amp.GradScaler]
    autocast_dtype: Optional[torch.dtype]
    sync_control: bool
    explicit_reduce: bool
    uniform: bool
    foreach: Optional[bool]
    window_norms: list[WindowBatchNorm]
    autocast_used: bool
    warned_autocast: bool
    _current: Optional["WindowState"]
    _plan: Optional[list[int]]
    _pass_window: int
    _last_seed: Optional[torch.Tensor]
    _last_weight: Any
    ahead_error: Optional[Exception] = None  # a counter's error while counting the next window

    def planned_ahead(self, ahead: int) -> int:
        """This rank's planned micro-batches for the window ``ahead`` windows after the open one."""
        if self._plan is None:
            return _weights.resolve_steps(self.steps, self.state.optimizer_step + ahead)
        i = self._pass_window + ahead
        return self._plan[i] if i < len(self._plan) else 0

    @property
    def reads_ahead(self) -> bool:
        """Whether the next window's micro-batches are drawn during this window's step, before
        the update: across ranks (every rank must know how many each has, in the step's one
        collective) and for a rule that counts them ahead. In one process otherwise, a window's
        micro-batches are drawn when it opens, after the previous update."""
        return self.parallel.world > 1 or bool(self.rule.ahead_fields)

    def window_counts(self, k: int) -> list[float]:
        """This rank's micro-batches (up to ``k``) for the next window, then what the rule
        counts of them ahead, then 1.0 if counting failed (the error is kept for the window
        it belongs to: ``ahead_error``): one vector, summed over ranks at the step."""
        counts = self.planner.local_count(k)
        try:
            return [counts] + self.rule.count_ahead(self.planner.held()) + [0.0]
        except Exception as exc:
            self.ahead_error = exc
            return [counts] + [0.0] * sum(size for _, size in self.rule.ahead_fields) + [1.0]

    def raise_ahead_error(self, failed: float) -> None:
        """The next window cannot open: a counter failed on this rank (its error) or another."""
        error, self.ahead_error = self.ahead_error, None
        if error is not None:
            raise error
        if failed:
            raise RuntimeError("a term's counter failed on another rank while counting the next window: "
                               "see that rank's error; no rank opens the window")

    def agree(self, counts: list[float]) -> int:
        """The next window's micro-batch count, the same on every rank."""
        return agree(counts)

    def check_current(self, window: "WindowState", finishing: bool = False) -> None:
        if window.closed or window.finished is not None:
            raise RuntimeError(
                "step() was already called for this window; iterate the next window" if finishing
                else "backward() after step(): this window is closed; use the next window"
            )
        if self._current is not None and window is not self._current:
            raise RuntimeError("this window is not the accumulator's open window: use the one acc.windows() yielded last")

    def skip_sync(self) -> contextlib.AbstractContextManager:
        return self.parallel.skip_sync() if self.sync_control else contextlib.nullcontext()

    def abandon(self, window: "WindowState", read: Optional[dict[str, list[float]]] = None) -> None:
        """Drop the open window without an update (after an error at its step). With the
        step's numbers (``read``) the next window is planned as usual, so a caller that goes
        on gets the rest of its data."""
        self.parallel.abandon()
        self.optimizer.zero_grad(set_to_none=True)
        self.stores.clear()
        self.state.close_window()
        window.rule.clear()
        window.closed = True
        self.planner.target = 0
        if read is not None:
            self.rule.open([v for name, _ in self.rule.ahead_fields for v in read[name]])
            self.planner.target = self.agree(read["counts"])


class WindowState:
    """One window's own counters and flags: what the parts read and change while it is open."""

    def __init__(self, accumulator: Parts, count: int):
        self._acc = accumulator
        self._count = count  # micro-batches this window hands out (stand-ins included)
        self._iterated = False
        self._last = False
        self.is_stand_in = False
        self.stand_ins = 0
        self.explicit_reduce = accumulator.explicit_reduce
        self.finished: Optional[StepReport] = None
        self.closed = False
        self.scaled = False
        self.rule: Rule = accumulator.rule  # a window of cached representations takes acc.coupled
        self.read: dict[str, list[float]] = {}  # the step's numbers, as read (see packet.py)
        self.mode: Optional[str] = None  # "backward" or "encode", fixed by the first call
        self.yielded = 0
        self.encoded: list[Any] = []  # encoded.Entry, one per encoded micro-batch
        self.encoded_done = False
        self.gathered = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast context of ``precision`` for the forward pass (empty for fp32).

        Backward runs outside it, as PyTorch's AMP guidance asks.

        Example:
            >>> with window.autocast():  # doctest: +SKIP
            ...     loss = model(**batch).loss
            >>> window.backward(loss, num_items=n)  # doctest: +SKIP
        """
        acc = self._acc
        acc.autocast_used = True
        if acc.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(acc.device.type, dtype=acc.autocast_dtype)
