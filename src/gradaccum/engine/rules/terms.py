"""Losses with several denominators, counted ahead: each term a mean over its own items.

The window's loss is ``sum_t (sum_i n_ti * L_ti) / N_t``, each ``N_t`` summed over the whole
window and every rank. One backward per micro-batch adds its terms' gradients together, and
a sum cannot be reweighed per term afterwards, so unlike the one-term case (a boundary scale
fixes the one denominator at the step) the weights ``n_ti / N_t`` must be right at the
backward. The engine already holds a window's micro-batches before its first backward (to
plan it), so it counts each term's items there with the user's counters and sums them
across ranks inside the collective the step already makes (``ahead_fields``). Without
counters, ``stored.py`` keeps one gradient per term instead (slower: one backward per term).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import torch

from ... import _weights
from ..._text import short
from ...moe import RouterLoss, balance_loss, probabilities, routing, split
from .. import rng
from ..termvalues import count, host_count, pair, term_means
from .base import Rule, add_nothing, check_autocast, no_num_items, weighted_backward

if TYPE_CHECKING:
    from ..._state import AccumulatorState
    from ..packet import Packet
    from ..parts import Parts, WindowState


class Terms(Rule):
    """Several terms whose window totals are counted before the window's first backward."""

    name = "terms counted ahead"

    def __init__(self, counters: dict[str, Any], device: torch.device, autocast: Any = None):
        self.names = list(counters)
        # A router loss (gradaccum.moe) is counted when its window opens, with the weights it
        # trains: its assignments depend on them, so they cannot be counted during the last step.
        self.routers: dict[str, RouterLoss] = {n: c for n, c in counters.items() if isinstance(c, RouterLoss)}
        self.counters = {n: c for n, c in counters.items() if n not in self.routers}
        self.device = device
        self.autocast = autocast  # the window's autocast, for the routers' counting forwards
        t = len(self.names)
        self.fields = (("term_items", t), ("term_loss", t), ("term_nan", t)) + (
            (("router_mismatch", 1),) if self.routers else ())
        self.ahead_fields = (("term_next", t),)
        self.totals = [0.0] * t
        self.routed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # each router's window assignments, rows
        self.counted: dict[int, dict[str, torch.Tensor]] = {}  # each micro-batch's assignments, by router
        self.rng: dict[int, tuple] = {}
        self.clear()

    def clear(self) -> None:
        # Per term: items given at the backward, loss sum sum_i n_i L_i, and zero counts whose
        # mean was not finite (float64, on the device: no host sync per micro-batch); then the
        # routers' assignments that the training pass made otherwise than the counting pass.
        self.sums_t = torch.zeros(3 * len(self.names) + (1 if self.routers else 0), dtype=torch.float64,
                                  device=self.device)

    def count_ahead(self, batches: Iterable[Any]) -> list[float]:
        out = [0.0] * len(self.names)
        for batch in batches:
            for j, name in enumerate(self.names):
                if name in self.counters:
                    out[j] += count(self.counters[name](batch), name, "the counter's value")
        return out

    def open_window(self, acc: "Parts", batches: list[Any], target: int) -> None:
        """Each router's window totals: a forward without gradients per micro-batch, its RNG
        state kept for the training forward, summed over ranks (one small all-reduce)."""
        if not self.routers:
            return
        self.counted, self.rng = {}, {}
        experts = {name: r.num_experts for name, r in self.routers.items()}
        totals = {name: torch.zeros(e + 1, dtype=torch.float64, device=self.device) for name, e in experts.items()}
        # Every rank runs the window's number of forwards: a sharded model gathers in each.
        for i, batch in enumerate(batches + batches[-1:] * max(0, target - len(batches))):
            real = i < len(batches)
            if real:
                self.rng[id(batch)] = rng.state(acc.device)
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                counted = {name: router.counted(batch) for name, router in self.routers.items()}
            if not real:
                continue
            self.counted[id(batch)] = {name: c[0] for name, c in counted.items()}
            for name, (assigned, rows) in counted.items():
                totals[name] += torch.cat([assigned.to(self.device), rows.to(self.device).reshape(1)])
        names = list(self.routers)
        summed: Any = acc.parallel.all_sum(torch.cat([totals[n] for n in names]))
        at = 0
        self.routed = {}
        for name in names:
            e = experts[name]
            self.routed[name] = (summed[at:at + e], summed[at + e])
            at += e + 1

    def before_micro_batch(self, batch: Any) -> None:
        state = self.rng.get(id(batch)) if self.routers else None
        if state is not None:  # route as the counting forward did: the same dropout and jitter draws
            rng.restore(state, self.device)

    def open(self, totals: list[float]) -> None:
        self.totals = list(totals)

    def backward(self, acc: "Parts", window: "WindowState", loss: Any, num_items: Any, batch: Any) -> None:
        mapping = self._mapping(loss, num_items)
        st = acc.state
        st.reference = 1.0  # the step's scale is the ranks' count alone: the weights are exact
        combined, first = self.combine(mapping, batch)
        if combined is None:  # no term has items here: its backward adds nothing, but still runs
            add_nothing(acc, first)
        else:
            check_autocast(acc, 5)
            weighted_backward(acc, combined, 1.0)
        st.micro_batches += 1

    def stand_in(self, acc: "Parts", window: "WindowState", loss: Any) -> None:
        self._mapping(loss, None)
        acc.state.reference = 1.0
        super().stand_in(acc, window, loss)

    def _mapping(self, loss: Any, num_items: Any) -> Mapping[str, Any]:
        if not isinstance(loss, Mapping):
            raise ValueError(
                f"window.backward(loss) on an Accumulator built with terms={self.names}: give the mapping "
                "{term: (mean, num_items)}, one entry per term this micro-batch has")
        no_num_items(num_items)
        return loss

    def combine(self, mapping: Mapping[str, Any], batch: Any) -> tuple[Optional[torch.Tensor], torch.Tensor]:
        """``sum_t L_t * n_t / N_t`` of one micro-batch (None when no term has items in it),
        and a mean to run a zero-weight backward through in that case."""
        unknown = [k for k in mapping if k not in self.counters and k not in self.routers]
        if unknown:
            raise ValueError(f"window.backward() got terms {short(unknown)} that the Accumulator does not count; "
                             f"its terms are {self.names} (Accumulator(terms=...))")
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        parts, given, losses, nans = [], [zero] * len(self.names), [zero] * len(self.names), [zero] * len(self.names)
        first: Optional[torch.Tensor] = None
        mismatch = None
        for j, name in enumerate(self.names):
            if name not in mapping:  # absent from this micro-batch: n = 0
                continue
            if name in self.routers:  # its share of the window's router loss, exact as it is
                part, off = self._router_share(name, mapping[name], batch)
                first = part if first is None else first
                parts.append(part)
                losses[j] = part.detach().reshape(()).to(device=self.device, dtype=torch.float64)
                mismatch = off if mismatch is None else mismatch + off
                continue
            mean, n = pair(mapping[name], name)
            first = mean if first is None else first
            n = host_count(self.counters[name](batch) if n is None else n, name)
            if not isinstance(n, torch.Tensor):
                if n == 0:  # no items: its mean may be 0/0, and it is never backpropagated
                    continue
                n64 = torch.full((), n, dtype=torch.float64, device=self.device)
            else:
                n64 = n.detach().reshape(()).to(device=self.device, dtype=torch.float64)
                # A zero count read on the device cannot skip the backward; a 0/0 mean would
                # make the window's gradient NaN, so the step names it instead.
                nans[j] = (n64 == 0) & ~torch.isfinite(mean.detach().to(torch.float64).reshape(()).to(self.device))
            given[j] = n64
            losses[j] = mean.detach().reshape(()).to(torch.float64) * n64
            total = self.totals[j]
            # Compute in fp32 at least: a bf16 weight would round the term's share.
            wide = mean.reshape(()).to(torch.promote_types(mean.dtype, torch.float32))
            parts.append(wide * (_weights.share(n64, total) if total > 0 else n64 * 0).to(wide.dtype))
        if first is None:
            raise ValueError(f"window.backward() got no term; give at least one of {self.names}")
        extra = [mismatch if mismatch is not None else zero] if self.routers else []
        self.sums_t += torch.stack(given + losses + [x.to(torch.float64) for x in nans] + extra).to(self.device)
        return (sum(parts[1:], parts[0]) if parts else None), first

    def _router_share(self, name: str, value: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """This micro-batch's share of the window's router loss, and how many of its top-k
        assignments differ from those its counting forward made."""
        router = self.routers[name]
        logits, mask = split(value)
        if name not in self.routed:
            raise RuntimeError(f"router term {name!r} has no window totals: its window was not opened by acc.windows()")
        assigned, rows = self.routed[name]
        share = router.coef * balance_loss(probabilities(logits, mask), assigned, rows, router.num_experts)
        counted = self.counted.get(id(batch), {}).get(name)
        if counted is None:  # a piece of a split micro-batch: its routing was counted whole
            return share, torch.zeros((), dtype=torch.float64, device=self.device)
        off = (routing(logits, router.top_k, mask)[0].to(self.device) - counted.to(self.device)).abs().sum()
        return share, off

    def sums(self, acc: "Parts") -> Any:
        return self.sums_t.clone()

    def scale(self, acc: "Parts", packet: "Packet") -> Any:
        return float(acc.parallel.world)  # the terms' weights were exact at the backward

    def check(self, read: dict[str, list[float]]) -> None:
        if self.routers and read["router_mismatch"][0]:
            raise ValueError(
                f"the training forwards routed {read['router_mismatch'][0]:.0f} token-expert assignment(s) of this window "
                "differently from the counting forwards, whose counts the router loss was weighed by; the window is not "
                "applied. Either the route function's token mask is not the one given to window.backward (padding "
                "counted in one pass only), or something random that the replayed RNG does not cover differs between "
                "them (a nondeterministic kernel, a generator other than torch's, data augmentation between the "
                "window's yield and the forward)")
        given, nans = read["term_items"], read["term_nan"]
        for j, name in enumerate(self.names):
            if nans[j]:
                raise ValueError(
                    f"term {name!r}: a micro-batch gave it a count of 0 as a device tensor and a mean that is not "
                    "finite (0/0). A count read on the host skips such a term; one on the device cannot, and the "
                    "window's gradient would be NaN, so it is not applied. Give that count as a number, leave the "
                    "term out of the mapping, or make its mean finite when empty (sum / count.clamp(min=1))")
            if name not in self.routers and not abs(given[j] - self.totals[j]) <= 1e-6 * max(1.0, self.totals[j]):
                raise ValueError(
                    f"term {name!r}: the micro-batches' num_items add up to {given[j]:g} over the window, but its "
                    f"counter counted {self.totals[j]:g} when the window opened. The weights came from the counter, "
                    "so this window is not applied: make the counter count what the term averages over")

    def report(self, acc: "Parts", read: dict[str, list[float]]) -> dict[str, Any]:
        means = term_means(self.names, self.totals, read["term_loss"])
        for j, name in enumerate(self.names):
            if name in self.routers:  # the shares add up to the window's router loss itself
                means[name] = read["term_loss"][j]
        out: dict[str, Any] = {"loss": sum(means.values()), "num_items": None, "terms": means}
        if self.routers:
            out["tokens_per_expert"] = {name: assigned.tolist() for name, (assigned, _) in self.routed.items()}
        return out

    def close(self, acc: "Parts", read: dict[str, list[float]]) -> None:
        self.clear()

    def save(self, acc: "Parts", saved: "AccumulatorState") -> None:
        if not acc.state.planned:
            return
        if self.routers and acc.state.micro_batches:
            raise RuntimeError("a mid-window state_dict with a router loss: the window's routing was counted with weights "
                               "this window has not updated yet, and is not in the saved state. Save at a window boundary "
                               "(after window.step())")
        sums = self.sums_t.tolist()
        t = len(self.names)
        saved.terms = {name: [self.totals[j], sums[j], sums[t + j]] for j, name in enumerate(self.names)}

    def check_load(self, acc: "Parts", new: "AccumulatorState") -> None:
        if new.terms is None and new.micro_batches:
            raise ValueError("the saved open window was accumulated without terms=..., and this Accumulator is built "
                             "with them: build it as the checkpointed one was")
        if new.terms is not None and sorted(new.terms) != sorted(self.names):
            raise ValueError(f"the saved open window has terms {sorted(new.terms)} but this Accumulator counts "
                             f"{sorted(self.names)}: build it with the checkpointed run's terms")

    def load(self, acc: "Parts", new: "AccumulatorState") -> None:
        saved = new.terms
        if not saved:
            self.clear()
            return
        self.totals = [float(saved[name][0]) for name in self.names]
        t = len(self.names)
        self.sums_t = torch.tensor([saved[n][1] for n in self.names] + [saved[n][2] for n in self.names] + [0.0] * t
                                   + ([0.0] if self.routers else []), dtype=torch.float64, device=self.device)
