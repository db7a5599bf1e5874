"""Pipeline parallel: a ``torch.distributed.pipelining`` schedule's step is a window.

A schedule (GPipe, 1F1B, interleaved, zero-bubble, V-shaped) splits the step's batch into micro-batches, calls its
``loss_fn`` on each at the last stage and, by default (``scale_grads=True``), divides the
gradients by the number of micro-batches: the mean of per-micro-batch means, which is not
the mean over the step's items when micro-batches hold different numbers of tokens.
:class:`ExactLoss` is a ``loss_fn`` that weighs each micro-batch's mean by its share of the
window's items: counted at the last stage from the step's whole target before the schedule
runs (summed over the data-parallel replicas in one small all-reduce), so the weight is exact
at each backward and reaches every stage through the pipeline's own backward. Build the
schedule with ``scale_grads=False``; average each stage's gradients over the replicas as
usual (DDP or FSDP2 per stage, or an all-reduce). DeepSpeed's ``PipelineEngine`` takes the
same loss in its ``PipelineModule``, with its iterator wrapped by :meth:`ExactLoss.windows`.

Example:
    >>> exact = ExactLoss(lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten(), ignore_index=-100),
    ...                   lambda y: (y != -100).sum())  # doctest: +SKIP
    >>> schedule = ScheduleGPipe(stage, n_microbatches=4, loss_fn=exact, scale_grads=False)  # doctest: +SKIP
    >>> exact.open(targets)  # the last stage, before each step  # doctest: +SKIP
    >>> schedule.step(target=targets, losses=losses)  # doctest: +SKIP
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist

from ._weights import share
from .engine.parallel import sum_over
from .engine.step import by_mesh, total_norm

__all__ = ["ExactLoss", "clip_grad_norm_"]


class ExactLoss:
    """A schedule's ``loss_fn`` whose micro-batches weigh their items in the window.

    Args:
        loss: ``(output, target) -> `` the micro-batch's mean loss over its items.
        count: ``target -> `` the items that mean is over (a tensor or a number); it must
            add up over the micro-batches of a step's target, as counting tokens does.
        data_parallel: the pipeline replicas' process group (the last stages of every
            replica), or None for one replica.
        divided_by: what the pipeline divides each micro-batch's loss by on its own (DeepSpeed's
            ``PipelineEngine`` divides by its accumulation steps; :meth:`windows` sets it).

    Example:
        >>> exact = ExactLoss(token_mean, lambda y: (y != -100).sum(), data_parallel=dp_group)  # doctest: +SKIP
    """

    def __init__(self, loss: Callable[[Any, Any], torch.Tensor], count: Callable[[Any], Any],
                 data_parallel: Optional[Any] = None, divided_by: int = 1):
        self.loss, self.count, self.group, self.divided_by = loss, count, data_parallel, divided_by
        self.total: Optional[float] = None
        self.loss_sum: Any = 0.0

    def open(self, target: Any) -> float:
        """Count the step's items from its whole ``target`` (every micro-batch), summed over the
        replicas; call it at the last stage before ``schedule.step``. Returns the total."""
        return self._open(torch.as_tensor(self.count(target), dtype=torch.float64).reshape(1))

    def windows(self, batches: Iterable[tuple[Any, Any]], engine: Any) -> Iterator[tuple[Any, Any]]:
        """DeepSpeed's ``PipelineEngine``: the ``(inputs, target)`` micro-batches to hand to
        ``engine.train_batch``, each step's counted before its first one is given out.

        ``train_batch`` pulls its accumulation steps' micro-batches one at a time, inside the
        schedule, and divides every loss by their number; this reads each step's micro-batches
        ahead, counts their targets over the replicas (the engine's data-parallel group) and
        undoes the engine's division. Wrap the iterator on every rank; the engine's reported
        loss is then the mean over the step's items.

        Example:
            >>> batches = exact.windows(iter(loader), engine)  # doctest: +SKIP
            >>> loss = engine.train_batch(batches)  # doctest: +SKIP
        """
        steps = int(engine.gradient_accumulation_steps())
        self.divided_by = steps
        if getattr(engine, "is_data_parallel", False):
            self.group = engine.grid.get_data_parallel_group()
        return self._counted(iter(batches), steps)

    def _counted(self, it: Iterator[tuple[Any, Any]], steps: int) -> Iterator[tuple[Any, Any]]:
        while window := list(itertools.islice(it, steps)):
            counts = [torch.as_tensor(self.count(target), dtype=torch.float64).reshape(1) for _, target in window]
            self._open(torch.cat([c.to(counts[0].device) for c in counts]).sum().reshape(1))
            yield from window

    def _open(self, local: torch.Tensor) -> float:
        self.total = float(sum_over(local, self.group) if self.group is not None else local)
        if self.total <= 0:
            raise ValueError("a pipeline step with no items to learn from: count(target) is 0 on every replica")
        self.loss_sum = 0.0
        return self.total

    def __call__(self, output: Any, target: Any) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("ExactLoss: the step's items are not counted yet. Call exact.open(target) with the step's "
                               "whole target before schedule.step(); under DeepSpeed, hand train_batch the iterator "
                               "exact.windows(batches, engine)")
        mean = self.loss(output, target)
        n = self.count(target)
        self.loss_sum = self.loss_sum + mean.detach().double() * n
        world = dist.get_world_size(self.group) if self.group is not None else 1
        # The micro-batch's share of the window's items, times the replicas whose gradients are
        # averaged and what the pipeline divides by; a tensor count stays on the device.
        weight = share(n.to(mean.device, torch.float64) if isinstance(n, torch.Tensor) else float(n), self.total,
                       world) * self.divided_by
        return mean * (weight.to(mean.dtype) if isinstance(weight, torch.Tensor) else weight)

    def close(self) -> float:
        """The step's mean loss over every item of every replica (one small all-reduce)."""
        local = torch.as_tensor(self.loss_sum, dtype=torch.float64).reshape(1)
        if self.group is not None:
            local = sum_over(local, self.group)
        assert self.total is not None
        value, self.total = float(local) / self.total, None
        return value


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, stages: Optional[Any] = None) -> torch.Tensor:
    """Clip a stage's gradients by the norm of the whole model's gradient; return that norm.

    A stage holds part of the model, so ``torch.nn.utils.clip_grad_norm_`` on it would clip by
    its own part's norm, a different factor on every stage. This sums the squared norms over
    ``stages`` (the pipeline ranks of one replica; tensor-parallel shards are made whole first)
    and scales every stage by the same factor. Call it after the gradients are averaged over
    the replicas, on every pipeline rank, with all of its stages' parameters.

    Example:
        >>> norm = clip_grad_norm_(stage_module.parameters(), 1.0, stages=mesh["pp"].get_group())  # doctest: +SKIP
    """
    params = [p for p in parameters if p.grad is not None]
    grads = [g for p in params if (g := p.grad) is not None]
    local = total_norm(grads, uniform=False, foreach=None) if grads else torch.zeros(())
    squared = local.double().reshape(1).pow(2)
    if stages is not None:
        squared = sum_over(squared, stages)
    norm = squared.sqrt().reshape(())
    # The same factor on every stage, as one model's clip would give; mesh by mesh, as the step clips.
    for group in by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, norm)
    return norm
