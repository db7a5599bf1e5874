"""TRL's ``GRPOTrainer`` and ``DPOTrainer`` under :class:`gradaccum.transformers.ExactAccumulationMixin`.

DPO: its losses are means over preference pairs (each micro-batch holds the chosen rows, then
the rejected ones), so a micro-batch's items are its pairs; the mixin's usual weighting is
then exact, partial micro-batches included. The losses that are not a mean of independent
per-pair terms are refused.

GRPO's batches are prompts: what a micro-batch's loss averages over (completion tokens, or
completions) exists only after generation. GRPO generates once per ``steps_per_generation``
micro-batches and keeps the completions, so when a window's first micro-batch is prepared
its whole window is known: its tokens and completions are counted there (and summed over
ranks). Each micro-batch's loss then has two terms with their own denominators, the policy
term (normalized as ``loss_type`` says) and the entropy bonus (a token mean); GRPO divides
each micro-batch's by k, a mean of means. The loss it returns is reweighed per term so
that the window's gradient is the gradient of the objective over all the window's
completions as one batch. The router auxiliary loss keeps GRPO's own weighting (it has no
items to count).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

from .._weights import share

# What each loss type's policy term averages over in the big batch.
_ROWS, _TOKENS, _PADDED = "completions", "tokens", "completions x max_completion_length"
POLICY_ITEMS = {"grpo": _ROWS, "sapo": _ROWS, "luspo": _ROWS, "bnpo": _TOKENS, "dapo": _TOKENS,
                "cispo": _TOKENS, "vespo": _TOKENS, "dr_grpo": _PADDED}


def is_trl(trainer: Any, name: str) -> bool:
    """Whether ``trainer`` is TRL's trainer ``name`` (or a subclass of it)."""
    return any(c.__name__ == name and c.__module__.startswith("trl") for c in type(trainer).__mro__)


# DPO losses that couple a micro-batch's pairs (a sort over the batch) or average over tokens.
_DPO_REFUSED = {"aot": "sorts the pairs' log-ratios across the micro-batch",
                "aot_unpaired": "sorts the pairs' log-ratios across the micro-batch",
                "sft": "is a mean over the chosen completions' tokens, not over pairs"}


def dpo_pairs(trainer: Any) -> Callable[[Any], int]:
    """The counter of a DPO micro-batch's items, its pairs; refuses losses that are not per pair."""
    refused = [t for t in trainer.loss_types if t in _DPO_REFUSED]
    if refused:
        raise ValueError(
            f"DPO loss_type {refused[0]!r} {_DPO_REFUSED[refused[0]]}, so no weighting of micro-batches gives the "
            "big batch's update. Use per-pair losses (sigmoid, hinge, ipo, ...) with gradient accumulation, or "
            "train this loss without the mixin")
    return lambda batch: int(batch["input_ids"].shape[0]) // 2


def check(trainer: Any) -> None:
    """Refuse, before training, what cannot be made exact; say why and what to change."""
    args = trainer.args
    if trainer.loss_type not in POLICY_ITEMS:
        raise ValueError(f"exact accumulation knows GRPO's loss types {sorted(POLICY_ITEMS)}; "
                         f"loss_type={trainer.loss_type!r} is not one of them")
    if args.steps_per_generation % args.gradient_accumulation_steps:
        raise ValueError(
            f"steps_per_generation={args.steps_per_generation} is not a multiple of gradient_accumulation_steps="
            f"{args.gradient_accumulation_steps}: a window's completions must all exist before its first backward "
            "for its loss to be normalized over them. Make steps_per_generation a multiple of it (its default "
            "equals it)")
    if trainer.top_entropy_quantile < 1.0:
        raise ValueError(
            f"top_entropy_quantile={trainer.top_entropy_quantile}: the tokens that the policy loss (and the entropy "
            "bonus) average over are chosen by each micro-batch's own entropy quantile during its forward, so the "
            "window's count cannot be known before its first backward. Use top_entropy_quantile=1.0")


def _mask(inputs: dict[str, Any]) -> torch.Tensor:
    mask = inputs["completion_mask"]
    return mask * inputs["tool_mask"] if "tool_mask" in inputs else mask


def window_totals(trainer: Any, micro_batches: int) -> torch.Tensor:
    """[tokens, completions] of the window that starts now, over every rank (float64)."""
    first = trainer._step % trainer.args.steps_per_generation
    if first + micro_batches > len(trainer._buffered_inputs):
        raise RuntimeError(
            f"the window's {micro_batches} micro-batches start at slice {first} of a generation of "
            f"{len(trainer._buffered_inputs)}: its completions are not all generated yet. Keep steps_per_generation a "
            "multiple of gradient_accumulation_steps and windows aligned with generations (no partial epoch windows)")
    masks = [_mask(b) for b in trainer._buffered_inputs[first:first + micro_batches]]
    totals = torch.tensor([float(sum(int(m.sum()) for m in masks)), float(sum(m.shape[0] for m in masks))],
                          dtype=torch.float64, device=masks[0].device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return totals


def exact_loss(trainer: Any, inputs: dict[str, Any], totals: torch.Tensor, compute: Callable[[], Any]) -> torch.Tensor:
    """GRPO's micro-batch loss ``compute()``, reweighed per term to its share of the window."""
    args, k = trainer.args, trainer.current_gradient_accumulation_steps
    world = trainer.accelerator.num_processes
    coef = 0.0
    if trainer._entropy_bonus_enabled:  # the coefficient GRPO applies in this window, read before it moves
        adaptive_off = trainer.use_adaptive_entropy and trainer._last_world_entropy > args.entropy_target
        coef = 0.0 if adaptive_off else trainer.entropy_coef
    seen: dict[str, Any] = {}
    own = trainer._get_per_token_logps_and_entropies

    def capture(*a: Any, **kw: Any) -> Any:
        out = own(*a, **kw)
        seen.setdefault("out", out)
        return out

    trainer._get_per_token_logps_and_entropies = capture
    try:
        loss = compute()
    finally:
        del trainer._get_per_token_logps_and_entropies
    _, entropies, aux = seen["out"]
    mask = _mask(inputs).to(torch.float64)
    tokens, rows = mask.sum(), float(mask.shape[0])
    window_tokens, window_rows = totals[0].clamp(min=1.0), totals[1]
    items = POLICY_ITEMS[trainer.loss_type]
    # GRPO divided this micro-batch's policy sum by `divisor`; the big batch divides by `total`.
    if items == _ROWS:
        divisor, total = rows * k, window_rows
    elif items == _PADDED:
        divisor, total = rows * trainer.max_completion_length * k, window_rows * trainer.max_completion_length
    elif trainer.loss_type == "bnpo":
        divisor, total = tokens.clamp(min=1.0) * k, window_tokens
    else:  # normalized by the generation's tokens, rescaled by GRPO to one window of this rank
        divisor = inputs["num_items_in_batch"].to(torch.float64).clamp(min=1.0) / world * k / args.steps_per_generation
        total = window_tokens
    # DDP averages the ranks' gradients: each rank's share of the global sum, times the ranks.
    policy = share(divisor, total, world)
    entropy = share(tokens.clamp(min=1.0) * k, window_tokens, world)
    out = loss * policy.to(loss.dtype)
    if coef:
        e = mask.to(entropies.dtype)
        bonus = (entropies * e).sum() / e.sum().clamp(min=1.0) / k  # GRPO's own entropy term
        out = out + coef * bonus * (policy - entropy).to(loss.dtype)
    if aux is not None and trainer.aux_loss_enabled:
        out = out + trainer.router_aux_loss_coef * aux / k * (1 - policy).to(loss.dtype)
    return out
