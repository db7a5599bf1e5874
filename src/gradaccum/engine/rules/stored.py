"""Several terms without counters: one gradient store per term.

``window.backward({name: (mean, n), ...})`` on an Accumulator built without ``terms=``: no
term's window total is known before the window's first backward, so no single backward
can weigh the terms right. The first term named (the *primary*) goes through the mean rule
(its provisional weight, its boundary scale, the loop's own gradient sync); every other
term is differentiated on its own into a store (``engine/termgrads.py``), reduced over ranks
once at the step and added with its exact ``1 / N_t``. Slower than counting ahead (one
backward per extra term; ``benchmarks/terms.py``): build with ``terms=`` where a counter can
count a micro-batch's items before its forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..._text import short
from ..termgrads import TermGrads
from .base import Rule, add_nothing, check_autocast, check_loss, first_mean, no_num_items, shared_reference
from .mean import Mean
from ..termvalues import host_count, pair, term_means

if TYPE_CHECKING:
    from ..._state import AccumulatorState
    from ..packet import Packet
    from ..parts import Parts, WindowState


class StoredTerms(Rule):
    """The primary term through the mean rule, the others through one gradient store each."""

    name = "terms with a gradient store each"

    def __init__(self, mean: Mean, names: list[str], params: list[torch.Tensor], device: torch.device,
                 accum_dtype: Any = None):
        self.mean, self.names, self.device = mean, list(names), device
        self.grads = TermGrads(params, accum_dtype)
        self.clear_terms()

    @property
    def fields(self) -> tuple:  # type: ignore[override]
        t = len(self.names)
        return tuple(self.mean.fields) + (("term_items", t), ("term_loss", t))

    @classmethod
    def switch(cls, acc: "Parts", window: "WindowState", mapping: Mapping[str, Any]) -> Rule:
        """One process, no ``terms=``: serve this and every later window with one store per
        term, continuing the open window's one-term mappings (their term is the primary)."""
        mean = acc.rule
        assert isinstance(mean, Mean)
        names = ", ".join(map(str, mapping))
        if acc.parallel.world > 1:
            raise ValueError(
                f"window.backward() got {len(mapping)} terms ({names}) on an Accumulator built without terms=, "
                f"under {acc.parallel.name}. Every rank's step must carry the same terms from the first window on: "
                f"name them when building it, Accumulator(..., terms={list(mapping)!r}), or count them ahead "
                "with terms={name: counter} (faster; see docs/terms.md)")
        if mean.plain or window.stand_ins:
            raise ValueError("window.backward() got a mapping of several terms after plain losses in the same window: "
                             "give every micro-batch of a window the same form")
        first: list[str] = [mean.term] if mean.term is not None else []
        rule = cls(mean, first + [k for k in mapping if k not in first], acc.params, acc.device, acc.accum_dtype)
        if acc.state.micro_batches:  # the primary's micro-batches so far went through the mean rule
            counts = mean.counts.values()
            rule.items[0], rule.losses[0] = counts[0], counts[1]
        acc.rule = window.rule = rule
        return rule

    @classmethod
    def named(cls, mean: Mean, names: list[str], params: list[torch.Tensor], device: torch.device,
              accum_dtype: Any = None) -> "StoredTerms":
        """``Accumulator(terms=[names])``: the terms named when it is built (the first is the primary)."""
        return cls(mean, names, params, device, accum_dtype)

    def clear_terms(self) -> None:
        self.items = [0.0] * len(self.names)
        self.losses: list[Any] = [0.0] * len(self.names)

    def backward(self, acc: "Parts", window: "WindowState", loss: Any, num_items: Any, batch: Any) -> None:
        if not isinstance(loss, Mapping):
            raise ValueError(f"window.backward(loss) after window.backward({{...}}) with terms {self.names}: give "
                             "every micro-batch the mapping {term: (mean, num_items)}")
        no_num_items(num_items)
        unknown = [k for k in loss if k not in self.names]
        if unknown and acc.parallel.world > 1:
            raise ValueError(
                f"window.backward() got terms {short(unknown)} that no rank's first mapping named ({self.names}). "
                "Every rank's step must carry the same terms: name every term in the first mapping (an absent one "
                "as (mean, 0)), or count them ahead with Accumulator(terms={name: counter})")
        for name in unknown:  # one process: a term first seen now joins (from this window on)
            self.names.append(name)
            self.items.append(0.0)
            self.losses.append(0.0)
        present = []
        for j, name in enumerate(self.names):
            if name not in loss:
                continue
            mean, n = pair(loss[name], name)
            if n is None:
                raise ValueError(f"term {name!r} without its num_items: without terms= counters, give (mean, num_items)")
            n = host_count(n, name)
            if not isinstance(n, torch.Tensor) and n == 0:
                continue
            present.append((j, name, mean.reshape(()), n))
            self.items[j] = self.items[j] + n
            self.losses[j] = self.losses[j] + mean.detach().reshape(()).to(torch.float64) * n
        check_autocast(acc, 5)
        st = acc.state
        scale = acc.scaler.scale if acc.scaler is not None else None
        primary = present[0] if present and present[0][0] == 0 else None
        for j, name, mean, n in present:
            if j:  # kept for the backward below, which frees the graph
                self.grads.add(name, mean, n, retain_graph=True, scale=scale)
        if primary is not None:
            if st.reference is None and acc.parallel.world > 1:
                st.reference = _positive(shared_reference(acc, primary[3]))
            self.mean.add(acc, check_loss(primary[2]), primary[3])
            return
        # No primary here: the micro-batch still makes the loop's backward, at weight zero.
        if st.reference is None and acc.parallel.world > 1:  # the ranks with a primary make this collective
            zero = torch.zeros((), device=acc.device) if self.mean.counts.on_device else 0.0
            st.reference = _positive(shared_reference(acc, zero))
        add_nothing(acc, present[0][2] if present else first_mean(loss))
        st.micro_batches += 1

    def sums(self, acc: "Parts") -> Any:
        counts = self.mean.sums(acc)
        if isinstance(counts, torch.Tensor):
            # Numbers are filled in on the device, not copied from the host (a copy would wait).
            terms = [v.to(counts).reshape(1) if isinstance(v, torch.Tensor)
                     else torch.full((1,), float(v), dtype=torch.float64, device=counts.device) for v in self.items + self.losses]
            return torch.cat([counts] + terms)
        return list(counts) + [float(v) for v in self.items + self.losses]

    def scale(self, acc: "Parts", packet: "Packet") -> Any:
        if acc.state.reference is None or (not isinstance(packet["items"][0], torch.Tensor) and not packet["items"][0]):
            return 0.0  # the primary had no items anywhere: .grad holds zero-weight backwards only
        scale = self.mean.scale(acc, packet)
        if isinstance(scale, torch.Tensor):
            return torch.where(packet["items"][0] > 0, scale, torch.zeros_like(scale))
        return scale

    def finalize(self, acc: "Parts", packet: "Packet") -> None:
        totals = packet["term_items"]
        inverse = {}
        for j, name in enumerate(self.names[1:], start=1):
            n = totals[j]
            inverse[name] = torch.where(n > 0, 1.0 / n, torch.zeros_like(n)) if isinstance(n, torch.Tensor) \
                else (1.0 / n if n else 0.0)
        self.grads.combine(inverse, acc.parallel.all_sum if acc.parallel.world > 1 else None)  # type: ignore[arg-type]

    def check(self, read: dict[str, list[float]]) -> None:
        self.mean.check(read)

    def report(self, acc: "Parts", read: dict[str, list[float]]) -> dict[str, Any]:
        means = term_means(self.names, read["term_items"], read["term_loss"])
        return {"loss": sum(means.values()), "num_items": None, "terms": means}

    def close(self, acc: "Parts", read: dict[str, list[float]]) -> None:
        self.mean.close(acc, read)
        self.clear_terms()

    def clear(self) -> None:
        self.mean.clear()
        self.grads.clear()
        self.clear_terms()

    def take(self) -> Any:
        return self.grads.take(), list(self.items), list(self.losses)

    def put_back(self, held: Any) -> None:
        self.grads.put_back(held[0])
        pad = [0.0] * (len(self.names) - len(held[1]))  # a term first seen in the failed attempt stays named
        self.items, self.losses = held[1] + pad, held[2] + pad

    def merge(self, held: Any) -> None:
        self.grads.merge(held[0])

    def save(self, acc: "Parts", saved: "AccumulatorState") -> None:
        if acc.state.micro_batches:
            raise RuntimeError(
                "a mid-window state_dict with terms but no terms= counters: each term's partial gradient is held "
                "apart, outside the saved state. Save at a window boundary (after window.step()), or build the "
                "Accumulator with terms={name: counter}")
        self.mean.save(acc, saved)

    def check_load(self, acc: "Parts", new: "AccumulatorState") -> None:
        self.mean.check_load(acc, new)

    def load(self, acc: "Parts", new: "AccumulatorState") -> None:
        self.mean.load(acc, new)


def _positive(reference: Any) -> Any:
    """A shared reference of 0 (no rank had the primary yet) becomes 1: any positive number
    that every rank shares keeps the weights consistent."""
    if isinstance(reference, torch.Tensor):
        return torch.where(reference > 0, reference, torch.ones_like(reference))
    return reference if reference > 0 else 1.0
