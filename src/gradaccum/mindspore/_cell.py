"""The exact accumulator as a MindSpore ``Cell``: tensors and ``Parameter``s only.

Everything a window needs is held in parameters (the gradient sum, the item count, the
counters), and every decision is a tensor condition, so the whole train step can sit
under ``@ms.jit``: forward, gradients, accumulation and the update when the window closes.
The arithmetic is the PyTorch engine's (``gradaccum._weights``): micro-batch i is added
with the provisional weight n_i / D, D = (first micro-batch's items) x k, and the held sum
is multiplied by D / N when the window closes.

Across data-parallel ranks each rank sums its own micro-batches, and the window's close
reduces once: every gradient and the item count, flattened into one tensor, one
``AllReduce``. A rank that runs out early closes its partial window with ``flush()``,
which always takes part in that reduce, so ranks stay in step and do not hang.
"""

from __future__ import annotations

from typing import Any, Optional

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

__all__ = ["AccumulatorCell", "data_parallel_size", "flushes_needed"]

_LOW = (ms.float16, ms.bfloat16)


def data_parallel_size() -> int:
    """Ranks in the default communication group; 1 when ``init()`` was not called.

    Example:
        >>> data_parallel_size()  # doctest: +SKIP
        1
    """
    try:
        from mindspore.communication import GlobalComm, get_group_size

        return int(get_group_size()) if GlobalComm.INITED else 1
    except (ImportError, RuntimeError):  # a build without communication support
        return 1


def flushes_needed(micro_batches: int, steps: int) -> int:
    """How many times this rank calls ``flush()`` after its last micro-batch of an epoch.

    Under data parallel every window close is one reduce on every rank, so a rank with
    fewer micro-batches must join the others' remaining closes with empty flushes: it
    calls ``flush()`` (max over ranks of ceil(m / k)) - floor(m / k) times. It is a
    collective (one small ``AllReduce``): call it on every rank *before* the epoch's first
    micro-batch, while the ranks are in step, not after the last; on one process the answer is 1 for a partial last window, else 0.

    Example:
        >>> flushes = flushes_needed(7, steps=3)  # before the epoch
        >>> flushes  # one process: the partial window of 1
        1
    """
    windows = -(-int(micro_batches) // int(steps))
    world = data_parallel_size()
    if world > 1:
        from mindspore.communication import get_rank

        # AllReduce on CPU only sums float32: each rank fills its own slot, then the max.
        slots = np.zeros(world, np.float32)
        slots[get_rank()] = windows
        windows = int(round(float(ops.AllReduce()(Tensor(slots)).asnumpy().max())))
    return windows - int(micro_batches) // int(steps)


def _counter(name: str, dtype: Any = ms.float32) -> Parameter:
    return Parameter(Tensor(0, dtype), name=name, requires_grad=False)


class AccumulatorCell(nn.Cell):
    """Sum micro-batch gradients and update once per window, inside a compiled graph.

    Args:
        optimizer: a MindSpore optimizer (``nn.SGD``, ``nn.Adam``, ...). It is called once
            per window, so its learning-rate schedule counts updates, not micro-batches.
        steps: micro-batches per window, a positive int.
        max_grad_norm: clip the window's gradient to this total norm (the mean gradient,
            over all ranks), as ``torch.nn.utils.clip_grad_norm_`` does.
        reducer: sums a flat float32 tensor over the data-parallel ranks. Default:
            ``ops.AllReduce()`` when ``mindspore.communication.init()`` was called with
            more than one rank, else none. Pass your own to use another group.
        prefix: name prefix of the cell's parameters (checkpoints key on it).

    Call it with one micro-batch's gradients (of its *mean* loss, with respect to
    ``optimizer.parameters``), its item count ``num_items`` (a tensor; omit it and each
    micro-batch weighs the same) and optionally its loss. It returns a bool tensor: True
    when this call closed a window and updated the weights. After a close, the
    parameters ``last_loss``, ``last_grad_norm`` and ``last_items`` describe the window;
    ``windows``, ``skipped`` and ``reductions`` count closed windows, non-finite windows
    (no update) and reduces across ranks.

    Example:
        >>> accumulator = AccumulatorCell(optimizer, steps=4, max_grad_norm=1.0)  # doctest: +SKIP
        >>> @ms.jit  # doctest: +SKIP
        ... def train_step(data, label, n):
        ...     loss, grads = grad_fn(data, label)
        ...     return loss, accumulator(grads, n, loss)
    """

    def __init__(self, optimizer: Any, steps: int, max_grad_norm: Optional[float] = None,
                 reducer: Optional[Any] = None, prefix: str = "accum_") -> None:
        super().__init__(auto_prefix=False)
        from .._weights import check_steps

        if callable(steps):
            raise TypeError("steps must be a positive int (micro-batches per update); got a callable")
        self.steps = check_steps(steps)
        if max_grad_norm is not None and (isinstance(max_grad_norm, bool) or not max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")
        if not hasattr(optimizer, "parameters"):
            raise TypeError(
                f"optimizer must be a MindSpore optimizer (it has .parameters); got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.clip = max_grad_norm is not None
        params = list(optimizer.parameters)
        self.param_dtypes = tuple(p.dtype for p in params)
        # Low-precision parameters get float32 sums: n_i / D weights do not survive fp16.
        self.grads = ms.ParameterTuple(
            Parameter(Tensor(np.zeros(p.shape, np.float32)) if p.dtype in _LOW else ops.zeros(p.shape, p.dtype),
                      name=prefix + p.name, requires_grad=False)
            for p in params
        )
        self.shapes = tuple(tuple(p.shape) for p in params)
        self.sizes = tuple(int(np.prod(s)) if s else 1 for s in self.shapes)
        if reducer is None and data_parallel_size() > 1:
            reducer = ops.AllReduce()
        self.reducer = reducer
        self.distributed = reducer is not None
        self.micro_batches = _counter(prefix + "micro_batches", ms.int32)
        self.items = _counter(prefix + "items")
        self.reference = _counter(prefix + "reference")
        self.loss_sum = _counter(prefix + "loss_sum")
        # 0: no micro-batch yet, 1: counted, 2: uncounted; a mixed window is poisoned.
        self.mode = _counter(prefix + "mode", ms.int32)
        self.windows = _counter(prefix + "windows", ms.int32)
        self.skipped = _counter(prefix + "skipped", ms.int32)
        self.reductions = _counter(prefix + "reductions", ms.int32)
        self.last_loss = _counter(prefix + "last_loss")
        self.last_grad_norm = _counter(prefix + "last_grad_norm")
        self.last_items = _counter(prefix + "last_items")

    def state_parameters(self) -> list:
        """The cell's own parameters: gradient sums and counters, without the optimizer's.

        Example:
            >>> {p.name for p in accumulator.state_parameters()} >= {"accum_micro_batches"}  # doctest: +SKIP
            True
        """
        counters = (self.micro_batches, self.items, self.reference, self.loss_sum, self.mode, self.windows,
                    self.skipped, self.reductions, self.last_loss, self.last_grad_norm, self.last_items)
        return list(self.grads) + list(counters)

    def construct(self, grads: tuple, num_items: Optional[Tensor] = None, loss: Optional[Tensor] = None) -> Tensor:
        """Add one micro-batch; update when it completes the window. Returns True on update."""
        if num_items is None:
            n = ops.ones((), ms.float32)
            mode = 2
        else:
            n = ops.cast(num_items, ms.float32).reshape(())
            mode = 1
        first = self.micro_batches == 0
        mixed = ops.logical_and(ops.logical_not(first), self.mode != mode)
        ops.assign(self.mode, ops.select(first, Tensor(mode, ms.int32), self.mode))
        ops.assign(self.reference, ops.select(first, n * self.steps, self.reference))
        # A mixed window (counts for some micro-batches only) has no sound mean: poison it
        # so that its close skips the update and counts it in ``skipped``.
        n = ops.select(mixed, Tensor(float("nan"), ms.float32), n)
        w = n / self.reference
        for buf, g in zip(self.grads, grads):
            ops.assign_add(buf, ops.cast(g, buf.dtype) * ops.cast(w, buf.dtype))
        ops.assign_add(self.items, n)
        if loss is not None:
            ops.assign_add(self.loss_sum, ops.cast(loss, ms.float32).sum() * n)
        ops.assign_add(self.micro_batches, Tensor(1, ms.int32))
        stepped = ops.zeros((), ms.bool_)
        if self.micro_batches >= self.steps:
            stepped = self._close()
        return stepped

    def flush(self) -> Tensor:
        """Close the open, partial window (a mean over what it holds). Returns True on update.

        Single process: nothing happens when no micro-batch is held. Data parallel: it
        always takes part in the window's reduce, empty or not, so every rank closes the
        same number of windows; :func:`flushes_needed` says how many times to call it.

        Example:
            >>> @ms.jit  # doctest: +SKIP
            ... def flush():
            ...     return accumulator.flush()
            >>> flush()  # after the epoch's last micro-batch  # doctest: +SKIP
        """
        stepped = ops.zeros((), ms.bool_)
        if self.distributed:
            stepped = self._close()
        elif self.micro_batches > 0:
            stepped = self._close()
        return stepped

    def _close(self) -> Tensor:
        if self.distributed:
            # One reduce per window: sum_i n_i g_i of every parameter, N and the loss sum.
            parts = [ops.cast(buf, ms.float32).reshape(-1) * self.reference for buf in self.grads]
            parts.append(ops.stack([self.items, self.loss_sum]))
            flat = self.reducer(ops.concat(parts))
            ops.assign_add(self.reductions, Tensor(1, ms.int32))
            total, loss_sum = flat[-2], flat[-1]
            pieces = ops.split(flat[:-2], self.sizes)
            grads = tuple(p.reshape(s) / total for p, s in zip(pieces, self.shapes))
        else:
            total, loss_sum = self.items, self.loss_sum
            scale = self.reference / total  # D / N: the provisional weights become n_i / N
            grads = tuple(buf * ops.cast(scale, buf.dtype) for buf in self.grads)
        norm = ops.sqrt(ops.addn([ops.reduce_sum(ops.square(ops.cast(g, ms.float32))) for g in grads]))
        # total is 0 only for a data-parallel flush with nothing held on any rank; it is NaN
        # for a mixed window, which then counts as closed and skipped.
        closed = total != 0
        stepped = ops.logical_and(ops.logical_and(ops.isfinite(norm), ops.isfinite(total)), closed)
        if self.clip:
            coef = ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
            grads = tuple(g * ops.cast(coef, g.dtype) for g in grads)
        if stepped:
            self.optimizer(tuple(ops.cast(g, d) for g, d in zip(grads, self.param_dtypes)))
        ops.assign_add(self.skipped, ops.cast(ops.logical_and(closed, ops.logical_not(stepped)), ms.int32))
        ops.assign_add(self.windows, ops.cast(closed, ms.int32))
        # An empty close (data parallel, nothing anywhere) keeps the last window's report.
        ops.assign(self.last_loss, ops.select(closed, loss_sum / total, self.last_loss))
        ops.assign(self.last_grad_norm, ops.select(closed, norm, self.last_grad_norm))
        ops.assign(self.last_items, ops.select(closed, total, self.last_items))
        for buf in self.grads:
            ops.assign(buf, ops.zeros_like(buf))
        for counter in (self.items, self.reference, self.loss_sum):
            ops.assign(counter, ops.zeros((), ms.float32))
        ops.assign(self.micro_batches, Tensor(0, ms.int32))
        ops.assign(self.mode, Tensor(0, ms.int32))
        return stepped
