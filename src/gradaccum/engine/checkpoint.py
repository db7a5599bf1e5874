"""``state_dict`` / ``load_state_dict``: the one typed state, validated whole before use."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .._state import AccumulatorState
from .parts import Parts



def _number(v: Any) -> Any:
    return float(v) if isinstance(v, torch.Tensor) else v


def snapshot(acc: Parts) -> dict[str, Any]:
    """:class:`AccumulatorState` with the partial window's gradients, as a plain dict."""
    st = acc.state
    if st.micro_batches and acc.parallel.holds_window_grads:
        raise RuntimeError(f"a mid-window state_dict: {acc.parallel.holds_window_grads}")
    window = getattr(acc, "_current", None)
    rule = window.rule if window is not None and not window.closed else acc.rule
    saved = AccumulatorState(**{f.name: _number(getattr(st, f.name)) for f in dataclasses.fields(st) if f.name != "grads"})
    rule.save(acc, saved)  # the rule's own part: its counters, its terms
    if st.micro_batches:
        saved.grads = acc.stores.held()
    out = saved.to_dict()
    if acc.scaler is not None:
        out["scaler"] = acc.scaler.state_dict()
    return out


def restore(acc: Parts, saved: Any) -> None:
    """Validate ``saved`` whole, then replace the state; nothing changes when it is refused."""
    current = getattr(acc, "_current", None)
    if current is not None and not current.closed:
        raise RuntimeError("load_state_dict() while a window is open: call it before acc.windows(), or after window.step()")
    new = AccumulatorState.from_dict(saved, len(acc.params), [p.shape for p in acc.params])
    acc.rule.check_load(acc, new)
    scaler = saved.get("scaler")
    if scaler is not None and not isinstance(scaler, dict):
        raise TypeError(f"'scaler' must be a GradScaler state_dict; got {type(scaler).__name__}")
    if new.micro_batches and acc.parallel.holds_window_grads:
        raise ValueError(f"a mid-window state cannot be loaded here: {acc.parallel.holds_window_grads}")
    # Everything checked: apply. The live state object is kept (the counters refer to it).
    grads, new.grads = new.grads, {}
    for f in dataclasses.fields(new):
        setattr(acc.state, f.name, getattr(new, f.name))
    acc.stores.load(grads)
    acc.rule.load(acc, new)
    if acc.scaler is not None and scaler is not None:
        acc.scaler.load_state_dict(scaler)
