"""What a user hands for several terms, checked and read: the counters of
``Accumulator(terms=...)`` and each micro-batch's ``{term: (mean, num_items)}``.

Both the rules (``rules/terms.py``, ``rules/stored.py``), the loops that run their own
backward (``termgrads.TermWindow``) and the Trainer mixin read them the same way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Mapping

import torch

from .._text import short
from ..moe import RouterLoss

Counter = Callable[[Any], Any]


def check_counters(terms: Any) -> Any:
    """Validate ``Accumulator(terms=...)``: a non-empty mapping of names to counters (callables),
    or a list of names (no counters: one gradient store per term).

    >>> list(check_counters({"lm": len}))
    ['lm']
    >>> check_counters(("lm", "cls"))
    ['lm', 'cls']
    """
    if terms is None:
        return None
    if isinstance(terms, (list, tuple)) and terms and all(isinstance(t, str) for t in terms):
        if len(set(terms)) != len(terms):
            raise ValueError(f"terms names each term once; got {short(list(terms))}")
        return list(terms)
    if not isinstance(terms, Mapping) or not terms:
        raise TypeError(
            "terms must be a non-empty mapping of term names to counters, each a function micro-batch -> "
            f"items that term averages over (e.g. {{'lm': count_tokens, 'cls': len}}), or a list of the term "
            f"names (no counters: slower, one gradient store per term); got {short(terms)}")
    bad = [name for name, fn in terms.items() if not isinstance(name, str) or not (callable(fn) or isinstance(fn, RouterLoss))]
    if bad:
        raise TypeError(f"terms maps names (str) to counters (callables) or gradaccum.moe.RouterLoss; these entries "
                        f"are not: {short(bad)}")
    return dict(terms)


def count(value: Any, name: str, what: str) -> float:
    """A count as a float (>= 0); a tensor is read (counters run on the micro-batch as loaded)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        if value.is_meta:
            raise ValueError(f"{what} for term {name!r} is a meta tensor, which holds no value: give a number "
                             "or a tensor with data")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} for term {name!r} must be a finite number >= 0 (items that term averages over); "
                         f"got {short(value)}")
    return float(value)


def pair(value: Any, name: str) -> tuple[torch.Tensor, Any]:
    """A term's ``(mean, num_items)`` (or its mean alone: ``num_items`` None)."""
    mean, n = (value if isinstance(value, (tuple, list)) and len(value) == 2 else (value, None))
    if not isinstance(mean, torch.Tensor) or mean.numel() != 1 or not mean.requires_grad:
        raise ValueError(
            f"term {name!r}: give (mean, num_items) or the mean alone, where the mean is a scalar tensor that "
            f"requires grad (that term's mean over this micro-batch's items); got {short(value)}")
    return mean, n


def host_count(n: Any, name: str) -> Any:
    """``n`` as a host number where reading it costs nothing (a number, a CPU tensor); a device
    tensor is kept unread (checked at the step)."""
    if isinstance(n, torch.Tensor) and n.numel() == 1 and n.device.type != "cpu" and not n.is_meta:
        return n
    return count(n, name, "num_items")


def term_means(names: list[str], totals: list[float], losses: list[float]) -> dict[str, float]:
    """Each term's mean over the window (0 for a term with no items)."""
    return {name: (losses[j] / totals[j] if totals[j] else 0.0) for j, name in enumerate(names)}
