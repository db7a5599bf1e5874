"""The step: rescale, reduce, unscale, measure, clip; then update and close the window.

``finish`` leaves the window's mean gradient in ``.grad`` and says what an update would do;
``close`` does the bookkeeping after the optimizer ran (or was skipped). The window's rule
gives the boundary scale and the report; everything the host must know (the rule's sums,
the norm, device-side checks, the next window's micro-batch counts of every rank) travels
in one collective and is read in one go (``packet.py``): one host sync per window.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .._state import StepReport
from .packet import Packet, rank_vector
from .parts import Parts, WindowState



def by_mesh(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by the device mesh they lie on (plain tensors together): DTensors on
    different meshes (tensor-parallel layers on (dp, tp), the rest on (dp)) cannot be mixed in
    one norm or one clip.

    >>> len(by_mesh([torch.zeros(1), torch.ones(2)]))
    1
    """
    groups: dict[int, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(id(getattr(t, "device_mesh", None)), []).append(t)
    return list(groups.values())


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
    # One norm per device mesh, each made whole, then combined.
    norms = []
    for group in by_mesh(grads):
        norm = torch.nn.utils.get_total_norm(group, foreach=foreach)
        # Sharded gradients give a DTensor norm: the full value needs the shards' sum.
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def _packet(acc: Parts, window: WindowState, has_grad: bool) -> Packet:
    """The window's numbers summed over ranks: the window rule's sums, then host numbers
    (micro-batches, "has a gradient", each rank's micro-batches for the next window and what
    the accumulator's rule counts of it ahead)."""
    st, dp = acc.state, acc.parallel
    # The next window's micro-batches, drawn now where the step must know them (reads_ahead);
    # in one process otherwise they are drawn when it opens, after this window's update.
    ahead = acc.window_counts(acc.planned_ahead(1)) if acc.reads_ahead else [0.0, 0.0]
    host = [float(st.micro_batches), float(has_grad)] + rank_vector(dp.world, dp.rank, ahead[0]) + ahead[1:]
    host_layout = ([("micro_batches", 1), ("with_grad", 1), ("counts", dp.world)] + list(acc.rule.ahead_fields)
                   + [("ahead_failed", 1)])
    return Packet(window.rule.fields, host_layout, window.rule.sums(acc), host, dp.all_sum, dp.world)


def finish(acc: Parts, window: WindowState) -> StepReport:
    """Leave the window's mean gradient in ``.grad`` (clipped) and report; no update yet."""
    st, dp, stores, rule = acc.state, acc.parallel, acc.stores, window.rule
    if window.mode == "encode" and not window.encoded_done:
        raise RuntimeError("step() after window.encode() without window.backward_encoded(loss): call it once, after the last encode")
    if st.micro_batches == 0 and not window.stand_ins:
        raise RuntimeError("step() on a window with no backward(): call window.backward(loss) for its micro-batches first")
    # An engine that owns the gradient says whether it had one when it updates (see update()).
    has_grad = dp.owns_gradients or stores.any_grad()
    packet = _packet(acc, window, has_grad)
    scale = rule.scale(acc, packet)  # a device tensor on the device path: never read here
    if window.explicit_reduce:
        stores.materialize()  # every rank must reduce the same tensors
        dp.reduce_grads(stores.reducible())
    held = dp.finalize(stores, scale)
    rule.finalize(acc, packet)
    grads = held or []
    if acc.scaler is not None and grads:
        # Unscale before measuring or clipping: the clip threshold is for true gradients.
        acc.scaler.unscale_(acc.optimizer)
    # None: the engine holds the gradient and measures it in its update (NaN until then).
    norm_t = total_norm(grads, acc.uniform, acc.foreach) if held is not None else torch.full((), math.nan)
    if acc.max_grad_norm is not None and grads:
        # With the norm as a tensor: a non-finite norm makes NaNs, but that window is skipped.
        # Parameters on different device meshes (tensor parallel) are scaled mesh by mesh.
        for group in acc.param_groups_by_mesh:
            torch.nn.utils.clip_grads_with_norm_(group, acc.max_grad_norm, norm_t, foreach=acc.foreach)
    read = packet.read(norm_t, stores.deferred())  # the window's one host sync
    try:
        rule.check(read)
        stores.check(read["checks"])
    except Exception:
        acc.abandon(window, read)  # not applied; the caller may go on with the next window
        raise
    lr = acc.optimizer.param_groups[0].get("lr") if acc.optimizer.param_groups else None
    norm = read["norm"][0]
    window.finished = StepReport(
        step=st.optimizer_step + 1,
        micro_batches=int(read["micro_batches"][0]),
        grad_norm=norm,
        # Nothing to apply: no parameter received a gradient anywhere, or it is not finite.
        skipped=not read["with_grad"][0] or (held is not None and not math.isfinite(norm)),
        lr=float(lr) if lr is not None else None,
        splits=st.splits,
        stand_ins=window.stand_ins,
        **rule.report(acc, read),
    )
    window.scaled = acc.scaler is not None and bool(grads)
    window.read = read
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
    acc.state.optimizer_step += 1
    window.rule.close(acc, window.read)
    acc.state.close_window()
    window.closed = True
    read = window.read
    acc.rule.open([v for name, _ in acc.rule.ahead_fields for v in read[name]])
    acc.planner.target = acc.agree(read["counts"]) if acc.reads_ahead else 0
