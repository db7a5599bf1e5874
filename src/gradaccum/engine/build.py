"""Checking an Accumulator's arguments and choosing its parts, once, before any work.

A combination the engine cannot keep exact is refused here, with what to do instead, so
that no cell of feature x wrapper x precision is silently wrong.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _weights
from ..nn import WindowBatchNorm
from . import deepspeed as _deepspeed
from . import parallel as _parallel
from .counts import DeviceCounts, HostCounts
from .rules import Coupled, Mean, StoredTerms, Terms
from .termvalues import check_counters
from .grads import BufferStore, CompactStore, DenseStore, Stores, embedding_modules
from .plan import Lookahead, Planner
from .step import by_mesh
from .parts import Parts
from .._state import AccumulatorState

AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check(model: Any, optimizer: Any, scheduler: Any, max_grad_norm: Any, precision: Any, accum_dtype: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer) and not _parallel.is_deepspeed_engine(model):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
    if scheduler is not None and not callable(getattr(scheduler, "step", None)):
        raise TypeError("scheduler must have a step() method (a torch LR scheduler) or be None")
    if max_grad_norm is not None and (
        isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
    ):
        raise ValueError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")
    if precision not in AUTOCAST:
        raise ValueError(f"precision must be one of {sorted(AUTOCAST)}; got {precision!r}")
    if accum_dtype is not None and not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
        raise ValueError(f"accum_dtype must be a floating torch.dtype such as torch.float32 or None; got {accum_dtype!r}")


def _stores(model: torch.nn.Module, params: list[torch.Tensor], low: set[int], accum_dtype: Optional[torch.dtype],
            compact: bool, sync_free: bool) -> list[DenseStore]:
    """One store per way of holding: plain ``.grad``, fp32 buffers, compact embedding rows."""
    where = {id(p): i for i, p in enumerate(params)}
    modules = [m for m in embedding_modules(model) if id(m.weight) in where and where[id(m.weight)] not in low] \
        if compact else []
    rows = [where[id(m.weight)] for m in modules]
    dense = [i for i in range(len(params)) if i not in low and i not in rows]
    stores: list[DenseStore] = [DenseStore([params[i] for i in dense], dense)]
    if low:
        ordered = sorted(low)
        stores.append(BufferStore([params[i] for i in ordered], ordered, accum_dtype))  # type: ignore[arg-type]
    if modules:
        stores.append(CompactStore([params[i] for i in rows], rows, modules, sync_free=sync_free))
    return stores


def build_parts(acc: Parts, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: Any, scheduler: Any,
                max_grad_norm: Optional[float], precision: str, accum_dtype: Optional[torch.dtype],
                sync_every_micro_batch: bool, compact_embedding_grads: bool, device_counts: Optional[bool],
                terms: Any = None, data_parallel: Any = None) -> None:
    """Validate the arguments and set ``acc``'s parts; raises before any work is done."""
    _check(model, optimizer, scheduler, max_grad_norm, precision, accum_dtype)
    counters = check_counters(terms)
    acc.steps = _weights.check_steps(steps)
    acc.model, acc.optimizer, acc.scheduler = model, optimizer, scheduler
    acc.max_grad_norm, acc.precision, acc.accum_dtype = max_grad_norm, precision, accum_dtype
    # The data-parallel adapter, chosen once; it refuses what cannot hold under it.
    group = _parallel.data_parallel_group(model, list(model.parameters()), data_parallel)
    acc.parallel = dp = _parallel.adapter_for(model, (_deepspeed.DeepSpeed,), group)
    acc.optimizer, params, acc.max_grad_norm = dp.prepare(optimizer, precision, accum_dtype, compact_embedding_grads,
                                                          scheduler, max_grad_norm, sync_every_micro_batch)
    acc.params = params
    acc.param_groups_by_mesh = by_mesh(params)
    first = next(iter(model.parameters()), None)
    acc.device = first.device if first is not None else torch.device("cpu")
    # The fused per-list kernels also run on the CPU, where torch's default loops in Python.
    acc.foreach = all(p.device.type in ("cpu", "cuda") for p in params) or None
    # Gradients share their parameters' device and dtype: check once, not every step.
    kinds = {(type(p) in (torch.nn.Parameter, torch.Tensor), p.device, p.dtype) for p in params}
    acc.uniform = bool(acc.foreach) and len(kinds) == 1 and next(iter(kinds))[0]
    acc.autocast_dtype = AUTOCAST[precision]
    acc.scaler = torch.amp.GradScaler(acc.device.type) if precision == "fp16" else None
    acc.sync_control = dp.controls_sync(sync_every_micro_batch)

    low = {i for i, p in enumerate(params) if accum_dtype is not None and p.is_floating_point()
           and torch.finfo(p.dtype).bits < torch.finfo(accum_dtype).bits}
    on_device = device_counts if device_counts is not None else acc.device.type not in ("cpu", "meta")
    # An engine that owns the gradients (ZeRO) leaves the stores nothing to hold.
    stores = [] if dp.owns_gradients else _stores(
        model, params, low, accum_dtype, compact_embedding_grads, on_device)
    acc.stores = Stores(stores)
    # DDP reduces .grad in the last backward; gradients held elsewhere (fp32 buffers, rows)
    # would miss it, so then the engine reduces the window's sum itself at the step.
    acc.explicit_reduce = dp.reduces_in_backward and bool(acc.stores.held_elsewhere)
    acc.state = AccumulatorState()
    counts = DeviceCounts(acc.state, acc.device) if on_device else HostCounts(acc.state)
    # The rule, once: counters given, each term's items counted ahead; names given, one store
    # per term; else a mean over items, which hands several terms (one process) to the stores.
    if isinstance(counters, dict):
        autocast = AUTOCAST[precision]
        acc.rule = Terms(counters, acc.device, autocast=(lambda: torch.autocast(acc.device.type, dtype=autocast))
                         if autocast is not None else None)
    elif counters is not None:
        if not dp.can_store_terms:
            raise ValueError(
                f"terms={counters!r} (names without counters) under {dp.name}, which reduces inside every "
                "backward, so no term can be held apart. Give each term a counter, terms={name: counter}")
        acc.rule = StoredTerms.named(Mean(counts), counters, params, acc.device, accum_dtype)
    else:
        acc.rule = Mean(counts, several=StoredTerms.switch)
    acc.coupled = Coupled()
    acc.planner = Planner(Lookahead(()))
    acc._last_seed, acc._last_weight = None, 0.0
    acc.window_norms = [m for m in model.modules() if isinstance(m, WindowBatchNorm)]
    plain_bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not isinstance(m, WindowBatchNorm)]
    if plain_bn:
        warnings.warn(
            f"BatchNorm layers ({', '.join(plain_bn[:4])}{' ...' if len(plain_bn) > 4 else ''}) use "
            "micro-batch statistics, so accumulation cannot match the big batch for them; "
            "see gradaccum.nn.convert_batchnorm(model, to='window' or 'groupnorm')",
            stacklevel=3,
        )
