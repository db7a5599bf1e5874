"""How many items a batch's mean loss averages over: one rule for the library, the
Transformers integration and the recipes (torch only; no Transformers import)."""

from __future__ import annotations

from typing import Any, Mapping

import torch

KINDS = ("samples", "tokens", "causal-lm")


def count_items(batch: Mapping[str, Any], kind: str) -> int:
    """The number of items that the model's mean loss over ``batch`` averages over.

    ``"causal-lm"``: labels other than -100 after dropping each row's first position (the
    loss predicts token t+1 from token t), or ``shift_labels`` when the collator gives them.
    ``"tokens"``: labels other than -100. ``"samples"``: rows whose label is not -100.

    Example:
        >>> import torch
        >>> labels = torch.tensor([[5, 6, 7, -100], [8, 9, -100, -100]])
        >>> count_items({"labels": labels}, "causal-lm"), count_items({"labels": labels}, "tokens")
        (3, 5)
        >>> count_items({"labels": torch.tensor([0, 2, 1])}, "samples")
        3
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    labels: Any = batch.get("labels")  # checked by _need_labels wherever it is indexed
    if kind == "causal-lm":
        if "shift_labels" in batch:
            return int(batch["shift_labels"].ne(-100).sum())
        _need_labels(labels, kind)
        return int(labels[..., 1:].ne(-100).sum())
    if kind == "tokens":
        _need_labels(labels, kind)
        return int(labels.ne(-100).sum())
    if isinstance(labels, torch.Tensor):
        if labels.dim() == 1 and not labels.is_floating_point():
            return int(labels.ne(-100).sum())  # cross-entropy skips -100 rows
        return int(labels.shape[0])
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    raise ValueError("cannot count the samples of a batch with no tensors")


def _need_labels(labels: Any, kind: str) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"counting {kind!r} items needs a 'labels' tensor in the batch; got {type(labels).__name__}")
