"""The accumulation engine: the only loop that turns micro-batches into optimizer steps.

``accumulator`` (the public loop) over ``plan`` (window membership, stand-ins),
``grads`` (where gradients are held), ``parallel`` (one process, DDP, FSDP2), ``counts``,
``step`` and ``state``; ``build`` chooses the parts once.
"""

from .accumulator import Accumulator, Window
from .._state import AccumulatorState, StepReport

__all__ = ["Accumulator", "AccumulatorState", "StepReport", "Window"]
