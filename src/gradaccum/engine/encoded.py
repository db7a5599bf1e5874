"""Losses that couple the window's items (in-batch negatives): gradient caching.

A contrastive loss scores every item against every other one, so it is not a weighted sum
of micro-batch losses and ordinary accumulation cannot be exact for it. Gradient caching
(Gao et al., 2021) is: encode every micro-batch without a graph (saving its RNG state),
compute the loss over all the window's representations and backpropagate it only as far
as them, then re-encode each micro-batch with its saved RNG state and backpropagate the
cached representation gradients into the model. Memory is one micro-batch's activations
plus the window's representations; the gradient is the big batch's.

Across ranks every rank computes the same loss over the representations of all ranks
(:func:`gather`), so a rank's representation gradients are its own slice of that loss's
gradient and need no communication; the parameter gradients are then reduced once, at the
step, like any other window's.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from .parts import Parts, WindowState
from .rng import restore as rng_restore
from .rng import state as rng_state




class Entry:
    """One encoded micro-batch: what to run again, with which RNG state, and its leaves."""

    def __init__(self, fn: Callable[[Any], Any], batch: Any, rng: tuple, leaves: list[torch.Tensor], stand_in: bool):
        self.fn, self.batch, self.rng, self.leaves, self.stand_in = fn, batch, rng, leaves, stand_in


def _map(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``fn`` applied to every tensor of a tensor, tuple, list or dict (other values kept)."""
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, (tuple, list)):
        mapped = [_map(v, fn) for v in out]
        return type(out)(*mapped) if hasattr(out, "_fields") else type(out)(mapped)
    if isinstance(out, dict):
        return type(out)((k, _map(v, fn)) for k, v in out.items())
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []

    def keep(t: torch.Tensor) -> torch.Tensor:
        found.append(t)
        return t

    _map(out, keep)
    return found


def encode(acc: Parts, window: WindowState, fn: Callable[[Any], Any], batch: Any) -> Any:
    """See :meth:`Window.encode`."""
    acc.check_current(window)
    if not acc.parallel.can_encode:
        raise NotImplementedError(
            f"window.encode() under {acc.parallel.name} is not supported: it gathers or reduces inside "
            "every forward and backward, and the re-encoding pass would need its own plan for that. Use "
            "DDP (or one process) for cached coupled losses"
        )
    if window.mode == "backward":
        raise RuntimeError(
            "window.encode() in a window that already used window.backward(): a window either "
            "backpropagates micro-batch losses (backward/forward_backward) or caches "
            "representations (encode + backward_encoded), not both"
        )
    if window.encoded_done:
        raise RuntimeError("window.encode() after window.backward_encoded(): that window is complete; call window.step()")
    if window.mode is None:
        window.mode = "encode"
        window.rule = acc.coupled
        if acc.parallel.world > 1:
            # Re-encoding runs without sync; the step reduces the window's gradient once.
            window.explicit_reduce = True
    rng = rng_state(acc.device)
    with torch.no_grad(), window.autocast():
        out = fn(batch)
    if not _tensors(out):
        raise TypeError(f"the encode function must return a tensor, or a tuple/list/dict of tensors; it returned {type(out).__name__}")
    stand_in = window.is_stand_in
    leaves: list[torch.Tensor] = []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if stand_in:
            t = t[:0]  # a stand-in adds no items: its representations must not enter the loss
        if t.is_floating_point():
            t.requires_grad_(True)
        leaves.append(t)
        return t

    result = _map(out, leaf)
    window.encoded.append(Entry(fn, batch, rng, leaves, stand_in))
    if stand_in:
        window.stand_ins += 1
    return result


def backward_encoded(acc: Parts, window: WindowState, loss: torch.Tensor) -> None:
    """See :meth:`Window.backward_encoded`."""
    acc.check_current(window)
    _check(acc, window, loss)
    st, world, rule = acc.state, acc.parallel.world, acc.coupled
    seed = torch.full((), rule.loss_seed(world), dtype=loss.dtype, device=loss.device)
    factor = rule.representation_factor(world)
    with (acc.skip_sync() if acc.sync_control else contextlib.nullcontext()):
        if acc.scaler is not None:
            acc.scaler.scale(loss.reshape(())).backward(seed)
        else:
            loss.reshape(()).backward(seed)
    acc.stores.absorb()
    entries = window.encoded
    # The loss may have drawn random numbers after the last encode; the reference run drew
    # them after the last forward too, so the re-encoding pass must leave the RNG as it found it.
    devices = [acc.device] if acc.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for i, entry in enumerate(entries):
            last = i == len(entries) - 1
            rng_restore(entry.rng, acc.device)
            with (acc.skip_sync() if acc.sync_control else contextlib.nullcontext()):
                with window.autocast():
                    out = entry.fn(entry.batch)
                if entry.stand_in:
                    continue  # its forward pairs with the other ranks' collectives; it adds nothing
                pairs = [(o, leaf.grad) for o, leaf in zip(_tensors(out), entry.leaves) if leaf.grad is not None]
                if pairs:
                    outs = [o for o, _ in pairs]
                    grads = [(g * factor if factor != 1.0 else g).to(o.dtype) for o, g in pairs]
                    torch.autograd.backward(outs, grads)
                    acc.stores.absorb()
            if not last:
                acc.stores.between()
    st.micro_batches = sum(1 for e in entries if not e.stand_in)
    rule.record(acc, loss)
    window.encoded_done = True
    window.encoded = []  # the representations and their gradients are no longer needed


def _check(acc: Parts, window: WindowState, loss: torch.Tensor) -> None:
    if window.mode != "encode" or not window.encoded:
        raise RuntimeError("window.backward_encoded() needs window.encode() for the window's micro-batches first")
    if window.encoded_done:
        raise RuntimeError("window.backward_encoded() was already called for this window: call it once, then window.step()")
    if window.yielded < window._count or len(window.encoded) != window.yielded:
        raise RuntimeError(
            f"window.backward_encoded() after {len(window.encoded)} encode() call(s) for "
            f"{window.yielded} of the window's {window._count} micro-batches: encode every "
            "micro-batch of the window (one encode per micro-batch) before the loss"
        )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        raise ValueError(
            "backward_encoded(loss) needs a scalar tensor computed from the representations that "
            "window.encode() returned (which require grad)"
        )
    if acc.parallel.world > 1 and not window.gathered:
        raise RuntimeError(
            "under DDP the loss must be computed over every rank's representations: pass them "
            "through window.gather() (every rank then computes the same loss, as one big batch would)"
        )


class _Gather(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the gradient is this rank's rows of it.

    Correct when every rank computes the same loss from the gathered tensor: then this
    rank's slice of the loss's gradient is the whole gradient of its rows, with no reduction.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        device = x.device
        if dist.get_backend() != "nccl" and device.type != "cpu":
            x = x.cpu()
        sizes_t = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
        sizes = [torch.zeros_like(sizes_t) for _ in range(world)]
        dist.all_gather(sizes, sizes_t)
        rows = [int(s) for s in sizes]
        padded = torch.zeros((max(rows),) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        # As bytes: a collective backend need not reduce or even know every dtype (bf16 on gloo).
        flat = padded.contiguous().view(torch.uint8) if padded.dim() else padded
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        pieces = [p.view(x.dtype)[:n] for p, n in zip(parts, rows)]
        ctx.start, ctx.rows = sum(rows[:rank]), rows[rank]
        return torch.cat(pieces).to(device)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.start: ctx.start + ctx.rows]


def gather(acc: Parts, window: WindowState, x: torch.Tensor) -> torch.Tensor:
    """See :meth:`Window.gather`."""
    if acc.parallel.world == 1:
        return x
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError("window.gather() takes a tensor with a batch dimension (dim 0)")
    window.gathered = True
    return _Gather.apply(x)
