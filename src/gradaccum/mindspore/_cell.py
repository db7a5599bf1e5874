"""The exact accumulator as a MindSpore ``Cell``: tensors and ``Parameter``s only.

Everything a window needs is held in parameters (the gradient sum, the item count, the
counters), and every decision is a tensor condition, so the whole train step can sit
under ``@ms.jit``: forward, gradients, accumulation and the update when the window closes.
The rules are the PyTorch engine's, restated in MindSpore ops (``gradaccum._weights`` is
plain Python, which a compiled graph cannot call): micro-batch i is added with the weight
``provisional_weight(n_i, reference=1, planned=1) = n_i`` (float32 keeps its relative
precision whatever the scale), and the window's sum is multiplied by
``boundary_scale(N, reference=1, planned=1) = 1 / N`` when it closes, folded into the
clipping factor: one multiply per parameter. A test checks the cell against those functions.

MindSpore's CPU kernels cost about the same whatever their size, so the scalar
bookkeeping is packed: the open window's counters are one 4-vector, updated by one
``assign_add`` per micro-batch, and the running totals and the last window's report are
one 6-vector, written once per close.

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

from .._weights import check_steps

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


def _vector(name: str, size: int) -> Parameter:
    return Parameter(Tensor(np.zeros(size, np.float32)), name=name, requires_grad=False)


# Slots of the open window's vector and of the totals vector.
_MICRO, _ITEMS, _LOSS, _COUNTED = range(4)
_WINDOWS, _SKIPPED, _REDUCTIONS, _LAST_LOSS, _LAST_NORM, _LAST_ITEMS = range(6)


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
    when this call closed a window (an update, or a skip counted in ``skipped``). On the
    host, ``windows``, ``skipped`` and ``reductions`` count closed windows, windows
    skipped without an update (non-finite, or mixing counted and uncounted micro-batches)
    and reduces across ranks; ``last_loss``, ``last_grad_norm`` and ``last_items``
    describe the last closed window; ``micro_batches`` and ``items`` the open one.

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
        self.low = tuple(p.dtype in _LOW for p in params)
        # The sums the optimizer gets are float32 (float64 ones only outside data parallel).
        self.cast_back = tuple(p.dtype != ms.float32 for p in params)
        # Low-precision parameters get float32 sums: n_i g_i summed in fp16 loses the small ones.
        self.grads = ms.ParameterTuple(
            Parameter(Tensor(np.zeros(p.shape, np.float32)) if p.dtype in _LOW else ops.zeros(p.shape, p.dtype),
                      name=prefix + p.name, requires_grad=False)
            for p in params
        )
        self.shapes = tuple(tuple(p.shape) for p in params)
        self.sizes = tuple(int(np.prod(s)) if s else 1 for s in self.shapes)
        if reducer is None and data_parallel_size() > 1:
            reducer = ops.AllReduce()
        self.reducer: Any = reducer
        self.distributed = reducer is not None
        self.window = _vector(prefix + "window", 4)  # micro-batches, items, loss sum, counted ones
        self.totals = _vector(prefix + "totals", 6)  # windows, skipped, reductions, last loss, norm, items
        self.last_slots = Tensor(np.array([0, 0, 0, 1, 1, 1], np.bool_))

    def state_parameters(self) -> list:
        """The cell's own parameters: gradient sums and counters, without the optimizer's.

        Example:
            >>> [p.name for p in accumulator.state_parameters()][-2:]  # doctest: +SKIP
            ['accum_window', 'accum_totals']
        """
        return list(self.grads) + [self.window, self.totals]

    def construct(self, grads: tuple, num_items: Optional[Tensor] = None, loss: Optional[Tensor] = None) -> Tensor:
        """Add one micro-batch; close the window when it is full. Returns True on a close."""
        if num_items is None:
            n = ops.ones((), ms.float32)
            counted = 0.0
        else:
            n = ops.cast(num_items, ms.float32).reshape(())
            counted = 1.0
        for buf, g, low in zip(self.grads, grads, self.low):
            ops.assign_add(buf, (ops.cast(g, ms.float32) if low else g) * n)
        loss_part = ops.zeros((), ms.float32) if loss is None else ops.cast(loss, ms.float32).sum() * n
        ops.assign_add(self.window, ops.stack([ops.ones((), ms.float32), n, loss_part,
                                               ops.fill(ms.float32, (), counted)]))
        closing = self.window[_MICRO] >= self.steps
        if closing:
            self._close()
        return closing

    def flush(self) -> Tensor:
        """Close the open, partial window (a mean over what it holds). Returns True on an update.

        Single process: nothing happens when no micro-batch is held. Data parallel: it
        always takes part in the window's reduce, empty or not, so every rank closes the
        same number of windows; :func:`flushes_needed` says how many times to call it.

        Example:
            >>> @ms.jit  # doctest: +SKIP
            ... def flush():
            ...     return accumulator.flush()
            >>> flush()  # after the epoch's last micro-batch  # doctest: +SKIP
        """
        if self.distributed:
            # Every rank closes, empty or not. Compiled with a reducer, the close is inlined and
            # a read of the totals before and after it was not ordered around its writes (it
            # said False after an update): the close says itself whether it stepped.
            return self._close(say_stepped=True)
        before = self.totals[_WINDOWS:_REDUCTIONS] + 0  # windows, skipped: a copy, read before the close
        if self.window[_MICRO] > 0:
            self._close()
        after = self.totals[_WINDOWS:_REDUCTIONS]
        return ops.logical_and(after[0] > before[0], after[1] == before[1])

    def _close(self, say_stepped: bool = False) -> Optional[Tensor]:
        # Returns nothing from the train step: a value out of this branch cost MindSpore's
        # CPU graph more per update than all of the close's own arithmetic (measured).
        # ``say_stepped`` (a constant of the compiled flush): return whether the window stepped.
        window = self.window
        # Some micro-batches counted and some not: no sound mean, so the window is skipped.
        mixed = ops.logical_and(window[_COUNTED] > 0, window[_COUNTED] < window[_MICRO])
        if self.distributed:
            # One reduce per window: sum_i n_i g_i of every parameter, N and the loss sum.
            flat = ops.concat([self._flat(buf) for buf in self.grads] + [window[1:3]])
            flat = self.reducer(flat)
            total, loss_sum = flat[-2], flat[-1]
            sums = tuple(p.reshape(s) for p, s in zip(ops.split(flat[:-2], self.sizes), self.shapes))
            flat = flat[:-2]
            reduced = 1.0
        else:
            total, loss_sum = window[_ITEMS], window[_LOSS]
            sums = tuple(self.grads)
            flat = ops.concat([self._flat(buf) for buf in sums])
            reduced = 0.0
        # One dot product of the flattened sum: MindSpore's CPU ReduceSum, one per
        # parameter, cost more than all the rest of the accumulator (measured).
        norm = ops.sqrt(ops.tensor_dot(flat, flat, 1)) / total
        factor = 1.0 / total  # _weights.boundary_scale(N, 1, 1): sum_i n_i g_i / N, the big batch's mean
        if self.clip:
            factor = factor * ops.minimum(self.max_grad_norm / (norm + 1e-6), 1.0)
        # total is 0 only for a data-parallel flush with nothing held on any rank.
        closed = total > 0
        stepped = ops.logical_and(ops.logical_and(ops.isfinite(norm), closed), ops.logical_not(mixed))
        if stepped:
            self.optimizer(tuple(ops.cast(g * factor, d) if cast else g * factor
                                 for g, d, cast in zip(sums, self.param_dtypes, self.cast_back)))
        closed_f = ops.cast(closed, ms.float32)
        values = ops.stack([closed_f, closed_f - ops.cast(stepped, ms.float32),
                            ops.fill(ms.float32, (), reduced), loss_sum / total, norm, total])
        # Counter slots add; report slots take the new window's values, unless the close was empty.
        report = ops.logical_and(self.last_slots, closed)
        ops.assign(self.totals, ops.select(report, values,
                                           ops.select(self.last_slots, self.totals, self.totals + values)))
        for buf in self.grads:
            ops.assign(buf, ops.zeros_like(buf))
        ops.assign(self.window, ops.zeros((4,), ms.float32))
        return stepped if say_stepped else None

    @staticmethod
    def _flat(buf: Parameter) -> Tensor:
        # float32 sums (all but float64 parameters) need no cast; a no-op cast still runs.
        return buf.reshape(-1) if buf.dtype == ms.float32 else ops.cast(buf, ms.float32).reshape(-1)

    def _slot(self, vector: Parameter, slot: int) -> float:
        return float(vector.asnumpy()[slot])

    @property
    def micro_batches(self) -> int:
        """Micro-batches in the open window (host read)."""
        return int(self._slot(self.window, _MICRO))

    @property
    def items(self) -> float:
        """Items in the open window (host read)."""
        return self._slot(self.window, _ITEMS)

    @property
    def windows(self) -> int:
        """Windows closed so far, skipped ones included (host read)."""
        return int(self._slot(self.totals, _WINDOWS))

    @property
    def skipped(self) -> int:
        """Windows closed without an update: non-finite or mixed (host read)."""
        return int(self._slot(self.totals, _SKIPPED))

    @property
    def reductions(self) -> int:
        """Reduces across ranks so far: one per window under data parallel (host read)."""
        return int(self._slot(self.totals, _REDUCTIONS))

    @property
    def last_loss(self) -> float:
        """The last closed window's loss, item-weighted over its micro-batches and ranks."""
        return self._slot(self.totals, _LAST_LOSS)

    @property
    def last_grad_norm(self) -> float:
        """The last closed window's gradient norm, before clipping."""
        return self._slot(self.totals, _LAST_NORM)

    @property
    def last_items(self) -> float:
        """Items in the last closed window, all ranks."""
        return self._slot(self.totals, _LAST_ITEMS)
