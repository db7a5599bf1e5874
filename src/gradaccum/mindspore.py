"""Exact gradient accumulation for MindSpore: the seeds' ``Accumulator``, made exact.

The hand-written accumulator of the seeds adds raw micro-batch gradients and hands their
*sum* to the optimizer every ``accum_steps`` calls: k times the big-batch gradient, with
micro-batches of different sizes weighted alike, and a last partial window that never
updates. This one gives the optimizer the gradient of the mean over all the window's items,
with the same arithmetic as the PyTorch engine (``gradaccum._weights``), and imports no
torch, so it runs in an environment that has only MindSpore.

Example:
    >>> from gradaccum.mindspore import Accumulator  # doctest: +SKIP
    >>> acc = Accumulator(optimizer, steps=4, max_grad_norm=1.0)  # doctest: +SKIP
    >>> for data, label, n in dataset:  # doctest: +SKIP
    ...     loss, grads = grad_fn(data, label)
    ...     acc(grads, num_items=n, loss=loss)
    >>> acc.flush()  # the epoch's last, partial window  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional, Sequence

import mindspore as ms
import numpy as np
from mindspore import ops

from ._state import AccumulatorState, StepReport
from ._weights import boundary_scale, check_steps, micro_batch_items, provisional_weight

__all__ = ["Accumulator"]


class Accumulator:
    """Sum micro-batch gradients and update once per window, as the one big batch would.

    Args:
        optimizer: a MindSpore optimizer (``nn.SGD``, ``nn.Adam``, ...). Its learning-rate
            schedule advances once per update, never per micro-batch.
        steps: micro-batches per update, a positive int.
        max_grad_norm: clip the window's gradient to this total norm (the mean gradient,
            not a micro-batch's), as ``torch.nn.utils.clip_grad_norm_`` does.

    Call it once per micro-batch with the gradients of that micro-batch's *mean* loss.
    With ``num_items`` (the tokens or samples the loss averages over) micro-batch i weighs
    n_i / N, N being the items of the whole window; without, each micro-batch present
    weighs the same. Mixing both in one window is a ``ValueError``.

    The buffers are parameters named ``accum_<name>`` (as in the seeds), so
    ``mindspore.save_checkpoint`` can save them with the network; :meth:`state_dict`
    returns them with the counters for a mid-window resume.

    Example:
        >>> acc = Accumulator(optimizer, steps=4)  # doctest: +SKIP
        >>> updated = acc(grads, num_items=37, loss=loss)  # doctest: +SKIP
        >>> acc.last_report.grad_norm if updated else None  # doctest: +SKIP
    """

    def __init__(self, optimizer: Any, steps: int, max_grad_norm: Optional[float] = None) -> None:
        if callable(steps):
            raise TypeError("steps must be a positive int (micro-batches per update); got a callable")
        self.steps: int = check_steps(steps)  # type: ignore[assignment]
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")
        if not hasattr(optimizer, "parameters"):
            raise TypeError(
                f"optimizer must be a MindSpore optimizer (it has .parameters); got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.inner_grads = optimizer.parameters.clone(prefix="accum_", init="zeros")
        self.state = AccumulatorState()
        self.last_report: Optional[StepReport] = None
        self._losses: list[tuple[Any, float]] = []

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
            st.planned, st.reference, st.weighted = self.steps, float(n), weighted
        # Provisional weight n_i / D: the window's total N is unknown until it closes.
        w = provisional_weight(n, st.reference, st.planned)
        for buf, g in zip(self.inner_grads, grads):
            ops.assign_add(buf, (g * w).astype(buf.dtype))
        st.micro_batches += 1
        st.items += n
        if loss is not None:
            self._losses.append((loss, n))
        if st.micro_batches >= st.planned:
            return self._update()
        return False

    def flush(self) -> bool:
        """Update on the open, partial window (a mean over what it holds), if there is one.

        Example:
            >>> acc.flush()  # after the epoch's last micro-batch  # doctest: +SKIP
            True
        """
        return self._update() if self.state.micro_batches else False

    def _update(self) -> bool:
        st = self.state
        # D / N turns the provisionally weighted sum into the mean over the window's items.
        scale = boundary_scale(st.items, st.reference, st.planned)
        grads = tuple(buf * scale for buf in self.inner_grads)
        norm = float(ops.sqrt(ops.addn([ops.reduce_sum(ops.square(g.astype(ms.float32))) for g in grads])).asnumpy())
        st.optimizer_step += 1
        skipped = not math.isfinite(norm)
        if not skipped:
            if self.max_grad_norm is not None:
                coef = self.max_grad_norm / (norm + 1e-6)  # as torch.nn.utils.clip_grad_norm_
                if coef < 1.0:
                    grads = tuple(g * coef for g in grads)
            self.optimizer(grads)
        self.last_report = StepReport(
            step=st.optimizer_step, loss=self._window_loss(st.items), micro_batches=st.micro_batches,
            num_items=st.items if st.weighted else None, grad_norm=norm, skipped=skipped,
        )
        for buf in self.inner_grads:
            ops.assign(buf, ops.zeros_like(buf))
        self._losses.clear()
        st.close_window()
        return not skipped

    def _window_loss(self, items: float) -> float:
        if not self._losses:
            return float("nan")
        total = self.state.loss_sum + sum(float(np.asarray(_numpy(l)).sum()) * n for l, n in self._losses)
        return total / items

    def state_dict(self) -> dict[str, Any]:
        """Counters and partial gradients (numpy arrays), enough to resume mid-window.

        Example:
            >>> import pickle
            >>> blob = pickle.dumps(acc.state_dict())  # doctest: +SKIP
        """
        state = dataclasses.replace(self.state)
        state.loss_sum = self.state.loss_sum + sum(float(np.asarray(_numpy(l)).sum()) * n for l, n in self._losses)
        return {
            "state": dataclasses.asdict(state),
            "steps": self.steps,
            "grads": {buf.name: buf.asnumpy().copy() for buf in self.inner_grads},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next calls complete the saved window.

        Example:
            >>> acc.load_state_dict(pickle.loads(blob))  # doctest: +SKIP
        """
        grads = state_dict["grads"]
        names = [buf.name for buf in self.inner_grads]
        if sorted(grads) != sorted(names):
            missing = sorted(set(names) - set(grads))[:3]
            extra = sorted(set(grads) - set(names))[:3]
            raise ValueError(
                f"this state is for other parameters (missing {missing}, unexpected {extra}): "
                "restore it into an accumulator built on the same network's optimizer"
            )
        for buf in self.inner_grads:
            value = np.asarray(grads[buf.name])
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{buf.name}: saved shape {value.shape}, parameter shape {tuple(buf.shape)}")
            ops.assign(buf, ms.Tensor(value, dtype=buf.dtype))
        self.state = AccumulatorState(**state_dict["state"])
        self._losses = []


def _numpy(value: Any) -> Any:
    return value.asnumpy() if hasattr(value, "asnumpy") else value
