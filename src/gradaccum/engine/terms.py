"""Losses with several denominators: each term a mean over its own items.

The window's loss is ``sum_t (sum_i n_ti * L_ti) / N_t``, each ``N_t`` summed over the whole
window and every rank. One backward per micro-batch adds its terms' gradients together, and
a sum cannot be reweighed per term afterwards, so unlike the one-term case (a boundary scale
fixes the one denominator at the step) the weights ``n_ti / N_t`` must be right at the
backward. The engine already holds a window's micro-batches before its first backward (to
plan it), so it counts each term's items there with the user's counters and sums them
across ranks inside the collective the step already makes. ``benchmarks/terms.py`` measures
the alternative, one gradient store per term (one backward per term), against this.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional

import torch

from .._text import short

Counter = Callable[[Any], Any]


def check_counters(terms: Any) -> Optional[dict[str, Counter]]:
    """Validate ``Accumulator(terms=...)``: a non-empty mapping of names to callables.

    >>> list(check_counters({"lm": len}))
    ['lm']
    """
    if terms is None:
        return None
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError(
            "terms must be a non-empty mapping of term names to counters, each a function micro-batch -> "
            f"items that term averages over (e.g. {{'lm': count_tokens, 'cls': len}}); got {short(terms)}")
    bad = [name for name, fn in terms.items() if not isinstance(name, str) or not callable(fn)]
    if bad:
        raise TypeError(f"terms maps names (str) to counters (callables); these entries are not: {short(bad)}")
    return dict(terms)


def _count(value: Any, name: str, what: str) -> float:
    """A count as a float (>= 0); a tensor is read (counters run on the micro-batch as loaded)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} for term {name!r} must be a finite number >= 0 (items that term averages over); "
                         f"got {short(value)}")
    return float(value)


class Terms:
    """The open window's per-term totals and sums, and the combined loss of a micro-batch.

    ``totals`` (every rank's items of each term in the window) are set when the window
    opens; ``sums`` holds, per term, the items given at the backward and the loss sum
    ``sum_i n_i * L_i`` (float64, on the device: no host sync per micro-batch).
    """

    def __init__(self, counters: dict[str, Counter], device: torch.device):
        self.names = list(counters)
        self.counters = counters
        self.device = device
        self.totals = [0.0] * len(self.names)
        self.clear()

    def clear(self) -> None:
        self.sums = torch.zeros(2 * len(self.names), dtype=torch.float64, device=self.device)

    def count(self, batches: Iterable[Any]) -> list[float]:
        """This rank's items of each term in ``batches`` (a window's micro-batches)."""
        out = [0.0] * len(self.names)
        for batch in batches:
            for j, name in enumerate(self.names):
                out[j] += _count(self.counters[name](batch), name, "the counter's value")
        return out

    def combine(self, mapping: Mapping[str, Any], batch: Any) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``sum_t L_t * n_t / N_t`` of one micro-batch (None when no term has items in it),
        and a mean to run a zero-weight backward through in that case."""
        unknown = [k for k in mapping if k not in self.counters]
        if unknown:
            raise ValueError(f"window.backward() got terms {short(unknown)} that the Accumulator does not count; "
                             f"its terms are {self.names} (Accumulator(terms=...))")
        parts, given, losses = [], [], []
        first: Optional[torch.Tensor] = None
        for j, name in enumerate(self.names):
            if name not in mapping:  # absent from this micro-batch: n = 0
                given.append(torch.zeros((), dtype=torch.float64, device=self.device))
                losses.append(given[-1])
                continue
            mean, n = _pair(mapping[name], name)
            first = mean if first is None else first
            if n is None:
                n = self.counters[name](batch)
            if not isinstance(n, torch.Tensor):
                n = _count(n, name, "num_items")
                if n == 0:  # no items: its mean may be 0/0, and it weighs nothing
                    given.append(torch.zeros((), dtype=torch.float64, device=self.device))
                    losses.append(given[-1])
                    continue
            n64 = torch.as_tensor(n, dtype=torch.float64, device=self.device).reshape(())
            given.append(n64)
            losses.append(mean.detach().reshape(()).to(torch.float64) * n64)
            total = self.totals[j]
            # Compute in fp32 at least: a bf16 weight would round the term's share.
            wide = mean.reshape(()).to(torch.promote_types(mean.dtype, torch.float32))
            parts.append(wide * (n64 / total if total > 0 else n64 * 0).to(wide.dtype))
        if first is None:
            raise ValueError(f"window.backward() got no term; give at least one of {self.names}")
        self.sums += torch.stack(given + losses).to(self.device)
        return (sum(parts[1:], parts[0]) if parts else None), first

    def report(self, read: list[float]) -> tuple[dict[str, float], Optional[str]]:
        """Each term's window mean from the ranks' summed ``sums``, and what disagrees."""
        t = len(self.names)
        given, losses = read[:t], read[t:2 * t]
        means = {name: (losses[j] / self.totals[j] if self.totals[j] else 0.0) for j, name in enumerate(self.names)}
        for j, name in enumerate(self.names):
            if not abs(given[j] - self.totals[j]) <= 1e-6 * max(1.0, self.totals[j]):
                return means, (
                    f"term {name!r}: the micro-batches' num_items add up to {given[j]:g} over the window, but its "
                    f"counter counted {self.totals[j]:g} when the window opened. The weights came from the counter, "
                    "so this window is not applied: make the counter count what the term averages over")
        return means, None

    def saved(self) -> dict[str, list[float]]:
        sums = self.sums.tolist()
        t = len(self.names)
        return {name: [self.totals[j], sums[j], sums[t + j]] for j, name in enumerate(self.names)}

    def load(self, saved: Optional[dict[str, list[float]]]) -> None:
        """A saved window's totals and sums (its names checked by ``checkpoint.restore``)."""
        if not saved:
            self.clear()
            return
        self.totals = [float(saved[name][0]) for name in self.names]
        self.sums = torch.tensor([saved[n][1] for n in self.names] + [saved[n][2] for n in self.names],
                                 dtype=torch.float64, device=self.device)


def _pair(value: Any, name: str) -> tuple[torch.Tensor, Any]:
    mean, n = (value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, None))
    if not isinstance(mean, torch.Tensor) or mean.numel() != 1 or not mean.requires_grad:
        raise ValueError(
            f"term {name!r}: give (mean, num_items) or the mean alone, where the mean is a scalar tensor that "
            f"requires grad (that term's mean over this micro-batch's items); got {short(value)}")
    return mean, n
