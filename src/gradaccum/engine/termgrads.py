"""One gradient store per term, for loops that cannot count a window's terms before its first
backward (the engine without ``terms=``, Accelerate, Lightning).

A term's denominator N_t is known only when the window closes, and one backward adds all
terms together, after which no sum can be reweighed per term. So each term but one (the
*primary*, which goes through the loop's own backward into ``.grad`` with the one-term
rule's provisional weight) is differentiated on its own with ``torch.autograd.grad``:
nothing lands in ``.grad`` and no data-parallel hook fires, so the loop's gradient sync is
untouched. Term t's store holds this rank's ``sum_i g_ti n_ti / r_t`` (``r_t``: the term's
first count in the window on this rank, which keeps the numbers near 1 under a loss
scale). At the close the caller hands :meth:`TermGrads.combine` each term's ``1 / N_t``
(all ranks) and a sum over ranks; ``.grad`` gains ``sum_t store_t r_t / N_t``.

Cost (``benchmarks/terms.py``): one more backward per extra term in each micro-batch and one
gradient per extra term held; one flat all-reduce of the stores per window.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from .termvalues import count, pair, term_means

Reduce = Callable[[torch.Tensor], torch.Tensor]


class TermGrads:
    """The extra terms' gradients of one window on this rank.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> tg = TermGrads([w])
        >>> tg.add("aux", (w * 3).sum(), 2.0, retain_graph=False)
        >>> tg.combine({"aux": 0.5})  # N_aux = 2: the term's mean gradient lands in .grad
        >>> w.grad.tolist()
        [3.0, 3.0]
    """

    def __init__(self, params: list[torch.Tensor], accum_dtype: Optional[torch.dtype] = None):
        self.params = [p for p in params if p.requires_grad]
        self.accum_dtype = accum_dtype
        self.stores: dict[str, list[Optional[torch.Tensor]]] = {}
        self.refs: dict[str, Any] = {}

    def add(self, name: str, mean: torch.Tensor, n: Any, retain_graph: bool,
            scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        """Add the gradient of ``mean * n / r_name`` to ``name``'s store (``scale``: a loss
        scaler's ``scale``, so that the store is scaled like ``.grad``)."""
        ref = self.refs.setdefault(name, n)
        out = mean.reshape(()) * (n / ref)
        if scale is not None:
            out = scale(out)
        grads = torch.autograd.grad(out, self.params, retain_graph=retain_graph, allow_unused=True)
        store = self.stores.setdefault(name, [None] * len(self.params))
        for j, g in enumerate(grads):
            if g is None:
                continue
            if self.accum_dtype is not None and g.dtype != self.accum_dtype and g.is_floating_point():
                g = g.to(self.accum_dtype)
            held = store[j]
            store[j] = g if held is None else held.add_(g)

    def combine(self, inverse_totals: dict[str, Any], reduce: Optional[Reduce] = None) -> None:
        """``.grad += sum_t store_t * r_t * inverse_totals[t]``, summed over ranks by ``reduce``
        (every rank must call it, with the same names); the stores are then empty."""
        params = self.params
        total: list[Optional[torch.Tensor]] = [None] * len(params)
        for name, store in self.stores.items():
            factor = self.refs[name] * inverse_totals[name]
            for j, g in enumerate(store):
                if g is not None:
                    part = g.mul_(factor.to(g) if isinstance(factor, torch.Tensor) else factor)
                    held = total[j]
                    total[j] = part if held is None else held.add_(part)
        if reduce is not None:
            # Every rank reduces every parameter, in one flat tensor per dtype.
            filled: list[torch.Tensor] = [t if t is not None else torch.zeros_like(p, dtype=self.accum_dtype or p.dtype)
                                          for t, p in zip(total, params)]
            groups: dict[tuple, list[int]] = {}
            for j, t in enumerate(filled):
                groups.setdefault((t.device, t.dtype), []).append(j)
            for index in groups.values():
                flat = torch.cat([filled[j].reshape(-1) for j in index])
                summed = reduce(flat).to(flat)
                at = 0
                for j in index:
                    size = filled[j].numel()
                    filled[j] = summed[at:at + size].view_as(filled[j])
                    at += size
            total = list[Optional[torch.Tensor]](filled)
        with torch.no_grad():
            for p, extra in zip(params, total):
                if extra is not None:
                    grad = p.grad
                    p.grad = extra.to(p.dtype) if grad is None else grad.add_(extra.to(grad.dtype))
        self.clear()

    def clear(self) -> None:
        self.stores, self.refs = {}, {}

    def take(self) -> tuple[dict, dict]:
        """Set the stores aside before a retried attempt (see ``engine/retry.py``)."""
        held = (self.stores, self.refs)
        self.stores, self.refs = {}, dict(self.refs)
        return held

    def put_back(self, held: tuple[dict, dict]) -> None:
        self.stores, self.refs = held

    def merge(self, held: tuple[dict, dict]) -> None:
        """The attempt succeeded: its gradients join the ones set aside."""
        stores, refs = held
        for name, store in self.stores.items():
            old = stores.setdefault(name, [None] * len(self.params))
            for j, g in enumerate(store):
                if g is not None:
                    prior = old[j]
                    old[j] = g if prior is None else prior.add_(g)
        refs.update({k: v for k, v in self.refs.items() if k not in refs})
        self.stores, self.refs = stores, refs


class TermWindow:
    """Several terms in a loop that runs its own backward (Accelerate, Lightning): each
    micro-batch's primary term goes to the loop's backward with the window tally's weight,
    the others into :class:`TermGrads`; at the close, one collective of the tally's and the
    terms' counts, then the stores are added with their exact ``1 / N_t``.

    ``names``: the terms, fixed (required across ranks, where every rank's collective must
    carry the same terms); None in one process: the first mapping's, growing as new ones come.
    """

    def __init__(self, params: list[torch.Tensor], names: Optional[list[str]] = None, world: int = 1,
                 where: str = "this loop"):
        if names is None and world > 1:
            raise ValueError(
                f"a mapping of terms in {where} on {world} ranks: every rank's window must carry the same terms, so "
                "name them when building it (terms=['lm', 'cls'], the first being the one the loop backpropagates)")
        self.names = list(names or [])
        self.fixed = names is not None
        self.grads = TermGrads(params)
        self.clear()

    def clear(self) -> None:
        self.items: list[Any] = [0.0] * len(self.names)
        self.losses: list[Any] = [0.0] * len(self.names)

    def split(self, mapping: Any, scale: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
              ) -> tuple[torch.Tensor, Any]:
        """Differentiate every term but the primary into its store (weight ``n / r_t``); return
        the primary's mean and its count, or, where it is absent, a mean to backpropagate at
        weight zero and ``None``."""
        if not mapping:
            raise ValueError(f"a mapping of terms needs at least one term (its terms: {self.names})")
        unknown = [k for k in mapping if k not in self.names]
        if unknown and self.fixed:
            raise ValueError(f"terms {unknown} were not named when the loop was built (terms={self.names})")
        for name in unknown:
            self.names.append(name)
            self.items.append(0.0)
            self.losses.append(0.0)
        present = []
        for j, name in enumerate(self.names):
            if name in mapping:
                mean, n = pair(mapping[name], name)
                if n is None:
                    raise ValueError(f"term {name!r} without its num_items: give (mean, num_items)")
                n = count(n, name, "num_items")
                if n:
                    present.append((j, mean.reshape(()), n))
                    self.items[j] += n
                    self.losses[j] = self.losses[j] + mean.detach().reshape(()).to(torch.float64) * n
        for j, mean, n in present:
            if j:  # the loop's backward of the primary (or of a zero) frees the graph afterwards
                self.grads.add(self.names[j], mean, n, retain_graph=True, scale=scale)
        if present and present[0][0] == 0:
            return present[0][1], present[0][2]
        value = mapping[next(iter(mapping))]
        return (value[0] if isinstance(value, (tuple, list)) else value).reshape(()), None

    def local(self) -> list[Any]:
        """This rank's ``[items per term..., loss sums per term...]``."""
        return list(self.items) + list(self.losses)

    def close(self, summed: list[float], reduce: Optional[Reduce], unscale: float = 1.0) -> dict[str, float]:
        """Add the stores to ``.grad`` from the summed ``local()`` (``unscale``: divide stores
        that a loss scale multiplied, where ``.grad`` was unscaled already); each term's mean."""
        t = len(self.names)
        totals, losses = summed[:t], summed[t:2 * t]
        self.grads.combine({name: (1.0 / (totals[j] * unscale) if totals[j] else 0.0)
                            for j, name in enumerate(self.names)}, reduce)
        self.clear()
        return term_means(self.names, totals, losses)
