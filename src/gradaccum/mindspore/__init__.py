"""Exact gradient accumulation for MindSpore, in PyNative loops and inside ``@ms.jit``.

The hand-written accumulator of the seeds adds raw micro-batch gradients and hands their
*sum* to the optimizer every ``accum_steps`` calls: k times the big-batch gradient, with
micro-batches of different sizes weighted alike, and a last partial window that never
updates. These give the optimizer the gradient of the mean over all the window's items,
with the same arithmetic as the PyTorch engine, and import no torch.

- :class:`AccumulatorCell`: an ``nn.Cell`` whose state is ``Parameter``s, for a train
  step compiled whole with ``@ms.jit`` or ``GRAPH_MODE``, and for data parallel under
  ``msrun`` (one reduce per window).
- :class:`Accumulator`: the same cell driven from a Python loop, with Python errors,
  per-window reports and a picklable ``state_dict``.

Example:
    >>> from gradaccum.mindspore import AccumulatorCell  # doctest: +SKIP
    >>> accumulator = AccumulatorCell(optimizer, steps=4, max_grad_norm=1.0)  # doctest: +SKIP
    >>> @ms.jit  # doctest: +SKIP
    ... def train_step(data, label, n):
    ...     loss, grads = grad_fn(data, label)
    ...     return loss, accumulator(grads, n, loss)
"""

from ._cell import AccumulatorCell, data_parallel_size, flushes_needed
from ._eager import Accumulator

__all__ = ["Accumulator", "AccumulatorCell", "data_parallel_size", "flushes_needed"]
