"""``verify``: does accumulating this model over micro-batches give the big batch's gradient?"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from typing import Any, Callable

import torch

from .engine.split import batch_size, split_batch
from .engine import Accumulator


@dataclasses.dataclass
class VerifyReport:
    """What :func:`verify` found.

    Attributes:
        max_rel_error: the largest, over parameters, of |accumulated - big| / |big| (norms;
            |big| no smaller than 1e-4 of the whole gradient's norm, so that a gradient
            that is zero in exact arithmetic does not count its rounding noise).
        exact: ``max_rel_error`` is within ``tolerance``.
        causes: what makes the two differ or may make them differ, in words.
        tolerance: the bound used for ``exact``.
        steps: micro-batches the batch was split into.

    Example:
        >>> report = verify(model, loss_fn, batch)  # doctest: +SKIP
        >>> report.exact, report.causes  # doctest: +SKIP
        (False, ['BatchNorm layers normalize each micro-batch with its own statistics: bn1'])
    """

    max_rel_error: float
    exact: bool
    causes: list[str]
    tolerance: float
    steps: int


class _Capture(torch.optim.Optimizer):
    """An optimizer that records the gradients it is handed and changes nothing."""

    def __init__(self, params):
        super().__init__(params, {})
        self.grads: list = []

    @torch.no_grad()
    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() if p.grad is not None else None
                      for g in self.param_groups for p in g["params"]]


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def verify(
    model: torch.nn.Module,
    loss_fn: Callable[[Any], torch.Tensor],
    batch: Any,
    steps: int = 4,
    *,
    tolerance: float = 1e-4,
) -> VerifyReport:
    """Compare the gradient of ``batch`` at once with the one accumulated over ``steps``
    micro-batches (split along dim 0, weighted by their sizes), and name the likely causes
    of a difference. The model's weights, buffers, gradients and the RNG are left as they were.

    Args:
        model: the module, in the mode it is trained in (``train()`` usually).
        loss_fn: ``loss_fn(batch) -> scalar``, the mean loss over the batch's samples.
        batch: a tensor, or a dict/list/tuple of tensors with the samples along dim 0.
        steps: micro-batches to split into.
        tolerance: the largest relative error still called exact.

    Example:
        >>> report = gradaccum.verify(model, lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y))  # doctest: +SKIP
        >>> print(report.max_rel_error, report.causes)  # doctest: +SKIP
    """
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): n for n, p in model.named_parameters()}
    saved_state = copy.deepcopy(model.state_dict())
    saved_grads = [p.grad for p in params]
    rng = _rng_state()
    causes: list[str] = []
    try:
        n = batch_size(batch)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"verify compares one batch with its accumulation over steps >= 2 micro-batches; "
                             f"steps={steps!r} would compare the batch with itself")
        if n is None or n < steps:
            raise ValueError(f"verify needs a batch of at least steps={steps} samples along dim 0; got {n}")

        def big_batch() -> tuple[list, float]:
            model.load_state_dict(saved_state)
            for p in params:
                p.grad = None
            loss = loss_fn(batch)
            loss.backward()
            return [p.grad.detach().clone() if p.grad is not None else None for p in params], float(loss.detach())

        _set_rng_state(rng)
        big, big_loss = big_batch()
        again, _ = big_batch()  # without resetting the RNG: randomness shows as a difference
        if any(_rel(a, b) > tolerance for a, b in zip(again, big)):
            causes.append("randomness (dropout or other) changes the loss from one forward to the next: "
                          "call model.eval() or fix the seed to compare")
        missing = [names[id(p)] for p, g in zip(params, big) if g is None]
        if missing:
            causes.append(f"parameters that get no gradient: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))

        model.load_state_dict(saved_state)
        _set_rng_state(rng)
        for p in params:
            p.grad = None
        capture = _Capture(params)
        with warnings.catch_warnings():  # verify reports BatchNorm among its causes instead
            warnings.simplefilter("ignore")
            acc = Accumulator(model, capture, steps=steps)
        pieces = split_batch(batch, steps)
        losses: list[tuple[float, int]] = []
        for window in acc.windows(pieces):
            for piece in window:
                loss = loss_fn(piece)
                size = batch_size(piece) or 1  # split_batch made pieces along dim 0
                losses.append((float(loss.detach()), size))
                window.backward(loss, num_items=size)
            window.step()
        accumulated = capture.grads

        mean_of_pieces = sum(loss * k for loss, k in losses) / n
        sum_of_pieces = sum(loss for loss, _ in losses)
        random = any("randomness" in c for c in causes)  # then losses differ for that reason alone
        if not random and not math.isclose(big_loss, mean_of_pieces, rel_tol=1e-3, abs_tol=1e-6):
            if math.isclose(big_loss, sum_of_pieces, rel_tol=1e-3, abs_tol=1e-6):
                causes.append("the loss is a sum over samples, not a mean: divide by the number of items")
            else:
                causes.append(
                    f"the batch's loss ({big_loss:.6g}) is not the size-weighted mean of the micro-batches' "
                    f"losses ({mean_of_pieces:.6g}): the loss is not a mean over samples, or samples interact"
                )
        bn = [name for name, m in model.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]
        if bn:
            causes.append("BatchNorm layers normalize each micro-batch with its own statistics: "
                          + ", ".join(bn[:8]) + (" ..." if len(bn) > 8 else "")
                          + " (see gradaccum.nn.convert_batchnorm)")
        # A gradient that is zero in exact arithmetic (attention key biases: softmax ignores a
        # shift shared by all keys) holds only rounding noise; measure it against a floor.
        floor = 1e-4 * math.sqrt(sum(float(b.double().pow(2).sum()) for b in big if b is not None))
        errors = [_rel(a, b, floor) for a, b in zip(accumulated, big)]
        worst = max(errors) if errors else 0.0
    finally:
        model.load_state_dict(saved_state)
        for p, g in zip(params, saved_grads):
            p.grad = g
        _set_rng_state(rng)
    exact = worst <= tolerance
    if not exact and not causes:
        causes.append("an unexplained difference: look for a loss or model that mixes samples of a batch")
    return VerifyReport(max_rel_error=worst, exact=exact, causes=causes, tolerance=tolerance, steps=steps)


def _rel(a, b, floor: float = 0.0) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    ref = max(float(b.double().norm()), floor)
    diff = float((a.double() - b.double()).norm())
    return diff / ref if ref > 0 else (0.0 if diff == 0 else math.inf)
