"""One micro-batch: its weight in the window, its backward, its stand-in, its retries.

The loss is a mean over the micro-batch's n items; backpropagating it with weight n/D
makes the held gradient a sum over items (the mean of means is not the mean), and the
step's boundary scale D/N makes it the mean (see ``gradaccum._weights``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Mapping

import torch

from .. import _split
from .retry import forward_backward_with_retry
from .parts import Parts, WindowState



def micro_batch(acc: Parts, window: WindowState, loss: Any, num_items: Any, batch: Any = None) -> None:
    """Backpropagate ``loss`` with its provisional weight (see ``gradaccum._weights``), or a
    mapping of terms with their exact weights (see ``terms.py``)."""
    acc.check_current(window)
    if isinstance(loss, Mapping):
        if acc.terms is not None or len(loss) != 1:
            _terms(acc, window, loss, num_items, batch)
            return
        loss, num_items = _one_term(loss, num_items)  # one denominator: the boundary scale fixes it
    elif acc.terms is not None:
        raise ValueError(
            f"window.backward(loss) on an Accumulator built with terms={acc.terms.names}: give the mapping "
            "{term: (mean, num_items)}, one entry per term this micro-batch has")
    st = acc.state
    if window.is_stand_in:
        _stand_in(acc, window, loss)
        return
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss must be a scalar tensor (the mean over the micro-batch's items); got {shape}. "
            "Reduce it with .mean() or .sum() / num_items first."
        )
    if not loss.requires_grad:
        raise ValueError("loss does not require grad: compute it from the model's output, outside torch.no_grad()")
    _check_autocast(acc, 4)  # pointing at the caller of window.backward
    n, weighted = acc.counts.items(num_items)
    if st.micro_batches == 0 and acc.parallel.world == 1:
        # One process: the window's first micro-batch sets the scale, so a window of one
        # micro-batch is exactly the plain step and equal full windows need no rescaling.
        st.reference = n
    elif st.reference is None:
        # Across ranks the weights must share one reference: the mean of the ranks' first
        # micro-batches, once; later windows reuse the last window's global mean.
        st.reference = _shared(acc, n)
    # The loss is a mean over n items; weight n/D makes the held gradient a sum over items
    # (the mean of means is not the mean), and the boundary scale D/N makes it a mean.
    assert st.reference is not None
    weight = n / (st.reference * st.planned)
    if loss.dim():
        loss = loss.reshape(())
    if acc.scaler is not None:
        acc.scaler.scale(loss * weight).backward()
    else:
        # A tensor subclass (DTensor) wants its own kind of seed: it gets the plain weight.
        acc.parallel.backward(loss, _seed(acc, weight, loss) if type(loss) is torch.Tensor else weight)
    acc.stores.absorb()
    st.weighted = weighted
    st.micro_batches += 1
    acc.counts.record(loss, n)


def _check_autocast(acc: Parts, stacklevel: int) -> None:
    if acc.autocast_dtype is not None and not acc.autocast_used and not acc.warned_autocast:
        acc.warned_autocast = True
        warnings.warn(f"precision={acc.precision!r} but the forward ran outside window.autocast(): "
                      "wrap the forward in `with window.autocast():` (backward stays outside)", stacklevel=stacklevel)


def _one_term(mapping: Mapping[str, Any], num_items: Any) -> tuple[Any, Any]:
    ((name, value),) = mapping.items()
    if num_items is not None:
        raise ValueError("num_items with a mapping of terms: give each term's count inside it, {name: (mean, n)}")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return value[0], value[1]
    raise ValueError(
        f"term {name!r} without its num_items: give {{{name!r}: (mean, num_items)}}, or count it ahead with "
        f"Accumulator(terms={{{name!r}: counter}})")


def _terms(acc: Parts, window: WindowState, mapping: Mapping[str, Any], num_items: Any, batch: Any) -> None:
    """Several denominators: backpropagate ``sum_t L_t * n_t / N_t`` with the window's totals."""
    if acc.terms is None:
        raise ValueError(
            f"window.backward() got {len(mapping)} terms ({', '.join(map(str, mapping))}), but the Accumulator "
            "does not count them. Each term's window total must be known before the window's first backward: "
            "build it with Accumulator(..., terms={name: counter}), a function micro_batch -> items per term "
            "(see docs/terms.md)")
    if num_items is not None:
        raise ValueError("num_items with a mapping of terms: give each term's count inside it, {name: (mean, n)}")
    st = acc.state
    st.reference = 1.0  # the step's scale is the ranks' count alone: the weights are exact
    if window.is_stand_in:
        _add_nothing(acc, _first_mean(mapping))
        window.stand_ins += 1
        return
    combined, first = acc.terms.combine(mapping, batch)
    if combined is None:  # no term has items here: its backward adds nothing, but still runs
        _add_nothing(acc, first)
        st.micro_batches += 1
        return
    _check_autocast(acc, 5)
    if acc.scaler is not None:
        acc.scaler.scale(combined).backward()
    else:
        acc.parallel.backward(combined, _seed(acc, 1.0, combined) if type(combined) is torch.Tensor else 1.0)
    acc.stores.absorb()
    st.micro_batches += 1


def _shared(acc: Parts, n: Any) -> Any:
    if isinstance(n, torch.Tensor):
        return acc.parallel.all_sum(n.reshape(1).to(torch.float64))[0] / acc.parallel.world
    return acc.parallel.all_sum([n])[0] / acc.parallel.world


def _seed(acc: Parts, weight: Any, loss: torch.Tensor) -> torch.Tensor:
    """The weight as a tensor like ``loss``; kept while it repeats (equal micro-batches)."""
    if isinstance(weight, torch.Tensor):
        return weight.to(dtype=loss.dtype, device=loss.device).reshape(())
    seed = acc._last_seed
    if seed is None or acc._last_weight != weight or seed.dtype != loss.dtype or seed.device != loss.device:
        seed = acc._last_seed = torch.full((), weight, dtype=loss.dtype, device=loss.device)
        acc._last_weight = weight
    return seed


def _stand_in(acc: Parts, window: WindowState, loss: torch.Tensor) -> None:
    st = acc.state
    if st.reference is None:  # the other ranks make this all-reduce in their first backward
        st.reference = _shared(acc, torch.zeros((), device=acc.device) if acc.counts.on_device else 0.0)
    _add_nothing(acc, loss)
    window.stand_ins += 1


def _add_nothing(acc: Parts, loss: torch.Tensor) -> None:
    """A zero-weight backward: its collectives pair with the other ranks', it adds nothing."""
    acc.parallel.backward(loss.reshape(()), 0.0)
    acc.stores.absorb()


def forward_backward(acc: Parts, window: WindowState, batch: Any, loss_fn: Callable) -> None:
    """See :meth:`Window.forward_backward`."""
    acc.check_current(window)
    done = acc.state.micro_batches
    if not acc.parallel.can_roll_back_oom:
        _without_retry(acc, window, batch, loss_fn)
    else:
        forward_backward_with_retry(acc, window, batch, loss_fn, run_piece)
    acc.state.micro_batches = done + (0 if window.is_stand_in else 1)  # the pieces are one micro-batch


def run_piece(acc: Parts, window: WindowState, piece: Any, loss_fn: Callable, zero: bool = False) -> None:
    with window.autocast():
        out = loss_fn(piece)
    if isinstance(out, Mapping):
        if zero:
            _add_nothing(acc, _first_mean(out))
        else:
            micro_batch(acc, window, out, None, piece)
        return
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError(
            f"loss_fn must return (loss, num_items): the micro-batch's mean loss as a scalar tensor and "
            f"the items it averages over (or None); it returned {type(out).__name__}"
            + (f" of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else "")
        )
    if zero:  # a stand-in piece
        _add_nothing(acc, out[0])
        return
    micro_batch(acc, window, out[0], out[1])


def _first_mean(mapping: Mapping[str, Any]) -> torch.Tensor:
    value = next(iter(mapping.values()))
    return value[0] if isinstance(value, (tuple, list)) else value


def _without_retry(acc: Parts, window: WindowState, batch: Any, loss_fn: Callable) -> None:
    """FSDP2: run the remembered split, never retry; announce an OOM so that ranks blocked in
    a collective stop too, and say which split to restart with (``error.parts``)."""
    acc.parallel.watch_for_oom()
    total = _split.batch_size(batch) or 1
    parts = acc.state.parts
    pieces = _split.split_batch(batch, min(parts, total)) if parts > 1 else [batch]
    # Every rank must run as many forwards (each gathers): a micro-batch with fewer items
    # than the split repeats its last piece at weight zero.
    pieces += [None] * (parts - len(pieces))
    piece = batch
    try:
        for i, piece in enumerate(pieces):
            zero = piece is None
            piece = pieces[i - 1] if zero else piece
            # Only the final piece of the window's last micro-batch may synchronise. Other
            # micro-batches already run inside the window's no-sync switch, which FSDP2
            # does not nest, so pieces enter it only in the last micro-batch.
            if window._last and i < len(pieces) - 1:
                with acc.skip_sync():
                    run_piece(acc, window, piece, loss_fn, zero)
            else:
                run_piece(acc, window, piece, loss_fn, zero)
    except torch.OutOfMemoryError as exc:
        n = _split.batch_size(piece) or 1
        suggestion = max(parts + 1, -(-total // max(1, (n + 1) // 2)))
        message = (
            f"out of memory on rank {acc.parallel.rank} in a micro-batch of {n} item(s) under "
            f"{acc.parallel.name}, which gathers and reduces inside forward and backward, so the attempt "
            "cannot be undone on one rank alone. Resume from the last checkpoint with a smaller "
            f"micro-batch, or split each in {suggestion} (acc.state.parts = {suggestion}; gradaccum train: "
            "--micro-batch; torchrun: a restart budget)"
        )
        acc.parallel.announce_oom(message)
        error = torch.OutOfMemoryError(message)
        error.parts = suggestion  # type: ignore[attr-defined]
        raise error from exc
