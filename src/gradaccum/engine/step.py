"""The step: rescale, reduce, unscale, measure, clip; then update and close the window.

``finish`` leaves the window's mean gradient in ``.grad`` and says what an update would do;
``close`` does the bookkeeping after the optimizer ran (or was skipped). Everything the
host must know (counts, loss sum, norm, device-side checks, the next window's micro-batch
counts of every rank) is read in one go: one host sync per window on an accelerator.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import torch

from .._state import StepReport
from .parts import Parts, WindowState



def total_norm(grads: list[torch.Tensor], uniform: bool, foreach: Optional[bool]) -> torch.Tensor:
    """Total 2-norm; one fused call when all gradients share a device and dtype (``uniform``,
    known from the parameters once), skipping the regrouping ``get_total_norm`` does in Python.

    >>> float(total_norm([torch.tensor([3.0]), torch.tensor([4.0])], True, True))
    5.0
    """
    if not grads:
        return torch.zeros(())
    if uniform:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = torch.nn.utils.get_total_norm(grads, foreach=foreach)
    # FSDP2's sharded gradients give a DTensor norm: the full value needs the shards' sum.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def _rank_vector(world: int, rank: int, value: float) -> list[float]:
    # ``value`` at this rank's position: summed over ranks, it gives every rank's value.
    return [float(value) if r == rank else 0.0 for r in range(world)]


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":  # from pinned memory the copy does not wait for the device
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _sums(acc: Parts, has_grad: bool) -> tuple[list[float], Any]:
    """The window's numbers summed over ranks, as a device tensor on the device path.

    Layout: items, loss sum, invalid counts (the counters), per term its items and loss sum
    (with terms), then the host numbers: micro-batches, "has a gradient", each rank's
    micro-batches for the next window, and (with terms) each term's items in it.
    """
    st, dp = acc.state, acc.parallel
    ahead = acc.window_counts(acc.planned_ahead(1))
    host = [float(st.micro_batches), float(has_grad)] + _rank_vector(dp.world, dp.rank, ahead[0]) + ahead[1:]
    local = acc.counts.values()
    if acc.terms is not None:
        sums = acc.terms.sums
        local = torch.cat([local, sums.to(local)]) if isinstance(local, torch.Tensor) else local + sums.tolist()
    if isinstance(local, torch.Tensor):
        # One process keeps its host numbers on the host: copying them over would wait.
        return host, (dp.all_sum(torch.cat([local, _to_device(host, local.device)])) if dp.world > 1 else local)
    return host, dp.all_sum(local + host)


@dataclasses.dataclass
class _Read:
    """The window's numbers as read back in the one host sync (see ``_sums`` for the layout)."""

    items: float
    loss_sum: float
    invalid: float
    term_sums: list[float]
    micro_batches: float
    with_grad: float
    counts: list[float]  # each rank's micro-batches for the next window
    next_totals: list[float]  # each term's items in the next window (all ranks)
    norm: float
    checks: list[float]  # the stores' deferred checks


def _read(acc: Parts, host: list[float], sums: Any, norm_t: torch.Tensor, checks: list) -> _Read:
    world, t = acc.parallel.world, len(acc.terms.names) if acc.terms is not None else 0
    if isinstance(sums, torch.Tensor):  # the one host sync of the window
        read = torch.cat([sums, norm_t.detach().reshape(1).to(sums), *(c.reshape(1).to(sums) for c in checks)]).tolist()
        if world == 1:  # one process kept its host numbers on the host
            read[3 + 2 * t:3 + 2 * t] = host
    else:
        read = list(sums) + [float(norm_t)] + [float(c) for c in checks]
    rest = read[3 + 2 * t:]
    return _Read(items=read[0], loss_sum=read[1], invalid=read[2], term_sums=read[3:3 + 2 * t],
                 micro_batches=rest[0], with_grad=rest[1], counts=rest[2:2 + world],
                 next_totals=rest[2 + world:2 + world + t], norm=rest[2 + world + t], checks=rest[3 + world + t:])


def finish(acc: Parts, window: WindowState) -> StepReport:
    """Leave the window's mean gradient in ``.grad`` (clipped) and report; no update yet."""
    st, dp, stores = acc.state, acc.parallel, acc.stores
    if window.mode == "encode" and not window.encoded_done:
        raise RuntimeError("step() after window.encode() without window.backward_encoded(loss): call it once, after the last encode")
    if st.micro_batches == 0 and not window.stand_ins:
        raise RuntimeError("step() on a window with no backward(): call window.backward(loss) for its micro-batches first")
    # An engine that owns the gradient says whether it had one when it updates (see update()).
    has_grad = dp.owns_gradients or stores.any_grad()
    host, sums = _sums(acc, has_grad)
    items_t = sums[0]  # a device tensor on the device path: never read here
    assert st.reference is not None  # set by the window's first backward (or stand-in)
    # Held: sum_i n_i * g_i / D. Times D / N (and the ranks DDP/FSDP average over) = the mean.
    if acc.terms is not None:
        scale: Any = float(dp.world)  # the terms' weights were exact at the backward (see terms.py)
    else:
        scale = (st.reference * st.planned * dp.world) / items_t if isinstance(items_t, torch.Tensor) or items_t else 1.0
    if isinstance(scale, torch.Tensor):
        scale = scale.to(torch.float32)
    if window.explicit_reduce:
        stores.materialize()  # every rank must reduce the same tensors
        dp.reduce_grads(stores.reducible())
    held = dp.finalize(stores, scale)
    grads = held or []
    if acc.scaler is not None and grads:
        # Unscale before measuring or clipping: the clip threshold is for true gradients.
        acc.scaler.unscale_(acc.optimizer)
    # None: the engine holds the gradient and measures it in its update (NaN until then).
    norm_t = total_norm(grads, acc.uniform, acc.foreach) if held is not None else torch.full((), math.nan)
    if acc.max_grad_norm is not None and grads:
        # With the norm as a tensor: a non-finite norm makes NaNs, but that window is skipped.
        torch.nn.utils.clip_grads_with_norm_(acc.params, acc.max_grad_norm, norm_t, foreach=acc.foreach)
    checks = stores.deferred()
    r = _read(acc, host, sums, norm_t, checks)
    items, loss_sum, micro_batches, norm = r.items, r.loss_sum, r.micro_batches, r.norm
    means: Optional[dict[str, float]] = None
    try:
        if r.invalid:
            raise ValueError(
                "num_items must be > 0 and finite for every micro-batch (the tokens or samples that the "
                "loss averages over); a tensor count in this window was not. Skip a micro-batch with no "
                "items instead of backpropagating it. This window is not applied"
            )
        if acc.terms is not None:
            means, disagree = acc.terms.report(r.term_sums)
            if disagree:
                raise ValueError(disagree)
        stores.check(r.checks)
    except Exception:
        acc.abandon(window)
        raise
    lr = acc.optimizer.param_groups[0].get("lr") if acc.optimizer.param_groups else None
    if means is not None:
        loss_sum, items = sum(means.values()), 1.0
    window.finished = StepReport(
        step=st.optimizer_step + 1,
        loss=loss_sum / items if items else float("nan"),
        num_items=items if st.weighted is not False and means is None else None,
        micro_batches=int(micro_batches),
        grad_norm=norm,
        # Nothing to apply: no parameter received a gradient anywhere, or it is not finite.
        skipped=not r.with_grad or (held is not None and not math.isfinite(norm)),
        lr=float(lr) if lr is not None else None,
        splits=st.splits,
        stand_ins=window.stand_ins,
        terms=means,
    )
    window.scaled = acc.scaler is not None and bool(grads)
    window.next_counts, window.next_totals = r.counts, r.next_totals
    window.items_per_micro_batch = items / micro_batches if micro_batches else None
    return window.finished


def update(acc: Parts, window: WindowState) -> StepReport:
    """The optimizer step through the data-parallel adapter; the report completed by what
    only the update could measure (an engine that owns the gradient: its norm, its skip)."""
    report = window.finished
    assert report is not None
    measured = acc.parallel.update(acc.optimizer)
    if measured is not None:
        norm, applied = measured
        report = window.finished = dataclasses.replace(
            report, grad_norm=norm, skipped=not applied or not math.isfinite(norm))
    return report


def close(acc: Parts, window: WindowState) -> None:
    """After the update (or the skip): scaler, scheduler, zeroed gradients, counters."""
    report = window.finished
    assert report is not None
    if window.scaled and acc.scaler is not None:
        acc.scaler.update()  # backs the scale off after an overflow
    if not report.skipped and acc.scheduler is not None:
        acc.scheduler.step()
    acc.optimizer.zero_grad(set_to_none=True)
    acc.stores.clear(dense=False)
    for norm in acc.window_norms:  # their running statistics move once per window
        norm.close_window()
    st = acc.state
    st.optimizer_step += 1
    # Across ranks the next window reuses this window's global items per micro-batch: the
    # same number on every rank, and a boundary scale of 1 for a window like this one.
    st.reference = window.items_per_micro_batch if acc.parallel.world > 1 else None
    st.close_window()
    acc.counts.reset()
    if acc.terms is not None:
        acc.terms.clear()
        acc.terms.totals = window.next_totals
    window.closed = True
    acc.planner.target = acc.agree(window.next_counts)
