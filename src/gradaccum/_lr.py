"""Learning-rate scaling with the effective batch."""

from __future__ import annotations

import math

_RULES = ("none", "linear", "sqrt")


def scale_lr(base_lr: float, base_batch: int, effective_batch: int, rule: str = "linear") -> float:
    """Scale a learning rate tuned at ``base_batch`` to ``effective_batch``.

    Rules:
        ``"linear"``: lr * B / B0. Goyal et al. 2017, "Accurate, Large Minibatch SGD:
        Training ImageNet in 1 Hour" (arXiv:1706.02677), for SGD with warmup.
        ``"sqrt"``: lr * sqrt(B / B0). Krizhevsky 2014, "One weird trick for parallelizing
        convolutional neural networks" (arXiv:1404.5997); Malladi et al. 2022, "On the SDEs
        and Scaling Rules for Adaptive Gradient Algorithms" (arXiv:2205.10287), for Adam.
        ``"none"``: lr unchanged.

    Example:
        >>> scale_lr(1e-4, base_batch=32, effective_batch=128, rule="linear")
        0.0004
        >>> scale_lr(1e-4, base_batch=32, effective_batch=128, rule="sqrt")
        0.0002
    """
    if rule not in _RULES:
        raise ValueError(f"rule must be one of {_RULES}; got {rule!r}")
    for name, value in (("base_lr", base_lr), ("base_batch", base_batch), ("effective_batch", effective_batch)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} must be a positive number; got {value!r}")
    ratio = effective_batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr
