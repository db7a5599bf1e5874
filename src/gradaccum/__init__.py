"""gradaccum: gradient accumulation whose update equals the one big batch's update.

Example:
    >>> import gradaccum
    >>> acc = gradaccum.Accumulator(model, optimizer, steps=4)  # doctest: +SKIP
"""

from . import nn
from ._lr import scale_lr
from ._verify import VerifyReport, verify
from ._state import AccumulatorState, StepReport
from ._window import Accumulator, Window

__all__ = ["Accumulator", "AccumulatorState", "StepReport", "VerifyReport", "Window", "nn", "scale_lr", "verify"]
__version__ = "0.1.0"
