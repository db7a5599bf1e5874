"""gradaccum: gradient accumulation whose update equals the one big batch's update.

The PyTorch names load on first use, so that ``gradaccum.mindspore`` can be imported
where torch is not installed.

Example:
    >>> import gradaccum
    >>> acc = gradaccum.Accumulator(model, optimizer, steps=4)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import nn
    from ._lr import scale_lr
    from ._state import AccumulatorState, StepReport
    from ._end import end_rank
    from ._verify import VerifyReport, verify
    from .engine import Accumulator, Window

_WHERE = {
    "Accumulator": ".engine", "Window": ".engine",
    "AccumulatorState": "._state", "StepReport": "._state",
    "VerifyReport": "._verify", "verify": "._verify",
    "scale_lr": "._lr", "nn": None, "end_rank": "._end",
}

__all__ = sorted(_WHERE)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'gradaccum' has no attribute {name!r}")
    where = _WHERE[name]
    value = importlib.import_module(f".{name}", __name__) if where is None else getattr(
        importlib.import_module(where, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
