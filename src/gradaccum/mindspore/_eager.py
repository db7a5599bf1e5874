"""The accumulator for PyNative loops: :class:`AccumulatorCell` with Python-side checks.

The arithmetic lives in the cell; this wrapper adds what only the host can do: refuse a
window that mixes counted and uncounted micro-batches with a ``ValueError`` (the cell can
only skip it), read each closed window into a :class:`~gradaccum.StepReport`, and save
the open window as numpy arrays.
"""

from __future__ import annotations

import math
import typing
from typing import Any, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import ops

from .._state import AccumulatorState, StepReport
from .._weights import micro_batch_items
from ._cell import _LAST_ITEMS, _LAST_LOSS, _LAST_NORM, _SKIPPED, _WINDOWS, AccumulatorCell

__all__ = ["Accumulator"]


class Accumulator:
    """Sum micro-batch gradients and update once per window, as the one big batch would.

    Args:
        optimizer: a MindSpore optimizer (``nn.SGD``, ``nn.Adam``, ...). Its learning-rate
            schedule advances once per update, never per micro-batch.
        steps: micro-batches per update, a positive int.
        max_grad_norm: clip the window's gradient to this total norm (the mean gradient,
            not a micro-batch's), as ``torch.nn.utils.clip_grad_norm_`` does.
        reducer: as for :class:`AccumulatorCell` (data parallel: one reduce per window).

    Call it once per micro-batch with the gradients of that micro-batch's *mean* loss.
    With ``num_items`` (the tokens or samples the loss averages over) micro-batch i weighs
    n_i / N, N being the items of the whole window; without, each micro-batch present
    weighs the same. Mixing both in one window is a ``ValueError``.

    ``cell`` is the :class:`AccumulatorCell` doing the work; its parameters (named
    ``accum_<name>``, as in the seeds) can be saved with ``mindspore.save_checkpoint``.

    Example:
        >>> acc = Accumulator(optimizer, steps=4)  # doctest: +SKIP
        >>> updated = acc(grads, num_items=37, loss=loss)  # doctest: +SKIP
        >>> acc.last_report.grad_norm if updated else None  # doctest: +SKIP
    """

    def __init__(self, optimizer: Any, steps: int, max_grad_norm: Optional[float] = None,
                 reducer: Optional[Any] = None) -> None:
        self.cell = AccumulatorCell(optimizer, steps, max_grad_norm=max_grad_norm, reducer=reducer)
        self.steps = typing.cast(int, self.cell.steps)  # the cell compares counts with it: an int
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.inner_grads = self.cell.grads
        self.state = AccumulatorState()
        self.last_report: Optional[StepReport] = None
        self._has_loss = False

    def __call__(self, grads: Sequence[Any], num_items: Optional[Any] = None, loss: Optional[Any] = None) -> bool:
        """Add one micro-batch's gradients; update when this call completes a window.

        Returns True when the weights were updated (a skipped, non-finite window is False).

        Example:
            >>> if acc(grads, num_items=n, loss=loss):  # doctest: +SKIP
            ...     print(acc.last_report.loss)
        """
        grads = tuple(grads)
        if len(grads) != len(self.inner_grads):
            raise ValueError(
                f"got {len(grads)} gradients for the optimizer's {len(self.inner_grads)} parameters: take "
                "them from ms.value_and_grad(fn, None, optimizer.parameters), in that order"
            )
        st = self.state
        n, weighted = micro_batch_items(num_items, st.weighted)
        if st.micro_batches == 0:
            st.planned, st.weighted = self.steps, weighted
        count = ms.Tensor(float(n), ms.float32) if weighted else None
        self._has_loss |= loss is not None
        # The host knows when the window closes: no read of the cell's flag per micro-batch.
        closing = st.micro_batches + 1 >= st.planned
        skipped = self.cell.skipped if closing else 0
        self.cell(grads, count, loss)
        st.micro_batches += 1
        st.items += n
        if closing:
            return self._closed(skipped)
        return False

    def flush(self) -> bool:
        """Update on the open, partial window (a mean over what it holds), if there is one.

        Under data parallel every rank calls it, since the close is a collective.

        Example:
            >>> acc.flush()  # after the epoch's last micro-batch  # doctest: +SKIP
            True
        """
        if not self.state.micro_batches and not self.cell.distributed:
            return False
        skipped = self.cell.skipped
        self.cell.flush()
        return self._closed(skipped)

    def _closed(self, skipped_before: int) -> bool:
        st = self.state
        totals = self.cell.totals.asnumpy()  # one read for the whole report
        if int(totals[_WINDOWS]) == st.optimizer_step:  # an empty data-parallel close
            st.close_window()
            return False
        stepped = int(totals[_SKIPPED]) == skipped_before
        st.optimizer_step = int(totals[_WINDOWS])
        self.last_report = StepReport(
            step=st.optimizer_step,
            loss=float(totals[_LAST_LOSS]) if self._has_loss else math.nan,
            micro_batches=st.micro_batches,
            num_items=float(totals[_LAST_ITEMS]) if st.weighted else None,
            grad_norm=float(totals[_LAST_NORM]),
            skipped=not stepped,
        )
        self._has_loss = False
        st.close_window()
        return stepped

    def state_dict(self) -> dict[str, Any]:
        """Counters and partial gradients (numpy arrays), enough to resume mid-window.

        Example:
            >>> import pickle
            >>> blob = pickle.dumps(acc.state_dict())  # doctest: +SKIP
        """
        return {
            "steps": self.steps,
            "weighted": self.state.weighted,
            "has_loss": self._has_loss,
            "parameters": {p.name: p.asnumpy().copy() for p in self.cell.state_parameters()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next calls complete the saved window.

        Example:
            >>> acc.load_state_dict(pickle.loads(blob))  # doctest: +SKIP
        """
        saved = state_dict["parameters"]
        own = self.cell.state_parameters()
        names = [p.name for p in own]
        if sorted(saved) != sorted(names):
            missing = sorted(set(names) - set(saved))[:3]
            extra = sorted(set(saved) - set(names))[:3]
            raise ValueError(
                f"this state is for other parameters (missing {missing}, unexpected {extra}): "
                "restore it into an accumulator built on the same network's optimizer"
            )
        for p in own:
            value = np.asarray(saved[p.name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{p.name}: saved shape {value.shape}, parameter shape {tuple(p.shape)}")
        for p in own:
            ops.assign(p, ms.Tensor(np.asarray(saved[p.name]), dtype=p.dtype))
        self.sync_state()
        self.state.weighted = state_dict.get("weighted")
        self._has_loss = bool(state_dict.get("has_loss", False))

    def sync_state(self) -> None:
        """Read the Python-side counters back from the cell, e.g. after loading a checkpoint.

        Example:
            >>> ms.load_param_into_net(acc.cell, ms.load_checkpoint("step.ckpt"))  # doctest: +SKIP
            >>> acc.sync_state()  # doctest: +SKIP
        """
        cell = self.cell
        micro, items, loss_sum, counted = (float(v) for v in cell.window.asnumpy())
        self.state = AccumulatorState(
            optimizer_step=cell.windows, planned=self.steps, micro_batches=int(micro), items=items,
            weighted=None if micro == 0 else counted > 0,
        )
        self._has_loss = loss_sum != 0.0
