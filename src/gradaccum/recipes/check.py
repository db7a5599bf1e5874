"""``gradaccum verify``: run :func:`gradaccum.verify` on the train command's model and data."""

from __future__ import annotations

from typing import Any

import torch

from .._verify import VerifyReport, verify
from .config import ConfigError, TrainConfig
from .data import Batcher, resolve_device
from .model import prepare


def verify_config(cfg: TrainConfig) -> dict[str, VerifyReport]:
    """Reports for the first effective batch of the training data, split into k
    micro-batches: once as trained (``train()``: dropout on) and once in ``eval()``.

    Example:
        >>> reports = verify_config(TrainConfig(task="lm"))  # doctest: +SKIP
        >>> reports["eval"].exact  # doctest: +SKIP
        True
    """
    device = resolve_device(cfg.device)
    prep = prepare(cfg)
    model = prep.model.to(device)
    ids = prep.train_ids[: cfg.effective_batch]
    batcher = Batcher(ids, prep.splits.train_labels[: cfg.effective_batch], prep.tok.pad_token_id, cfg.task)
    batch = batcher.collate(list(range(len(ids))))
    batch.pop("num_items")
    batch = {k: v.to(device) for k, v in batch.items()}
    if cfg.task == "lm":
        # Token-weighted: the batch's loss is a mean over predicted tokens, so split it by
        # sequences and give verify the sum over tokens / the batch's token count instead.
        total = int((batch["labels"][:, 1:] != -100).sum())

        def loss_fn(b: dict[str, Any]) -> torch.Tensor:
            n = int((b["labels"][:, 1:] != -100).sum())
            return model(**b).loss * n / total * len(ids) / b["input_ids"].shape[0]
    else:
        def loss_fn(b: dict[str, Any]) -> torch.Tensor:
            return model(**b).loss

    steps = min(cfg.steps_per_window, len(ids))
    if steps < 2:
        raise ConfigError(
            f"gradaccum verify splits the first effective batch into k micro-batches, and here k = {steps} "
            f"(--effective-batch {cfg.effective_batch}, --micro-batch {cfg.micro_batch}, {len(ids)} example(s)): one "
            "micro-batch is the big batch itself, so there is nothing to compare. Give a smaller --micro-batch")
    out = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        out[mode] = verify(model, loss_fn, batch, steps=steps)
    return out
