"""Mixture-of-experts router losses, exact over a window of micro-batches.

The load-balancing loss of the Switch Transformer, as ``transformers`` computes it for
Mixtral, Qwen3-MoE, OLMoE, gpt-oss and about thirty more families
(``load_balancing_loss_func``), over every layer's router logits and the batch's tokens
(padding excluded by the attention mask):

    aux = E * sum_e (T_e / R) * (P_e / R)

with E experts, T_e the top-k assignments to expert e, P_e the sum of its routing
probabilities and R the rows (tokens x layers). Both factors are sums over the whole batch,
so the window's loss is not a weighted mean of the micro-batches' losses. But T is a count
(no gradient flows through it), so the window's gradient is the gradient of

    sum_i  E * sum_e T_e^window * P_e^i / (R^window)^2

one surrogate per micro-batch, each needing the window's assignments and rows before its
backward: they are counted by a forward without gradients over the window's micro-batches
when the window opens (after the previous update), with the RNG of each replayed for its
training forward, so both route alike (dropout, router jitter). The training pass's own
routing is compared with the counted one, and a window where they differ is refused.

Example:
    >>> logits = (torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 1.0]]),)  # one layer, two tokens, three experts
    >>> assigned, rows = routing(logits, top_k=1)
    >>> assigned.tolist(), float(rows)
    ([1.0, 1.0, 0.0], 2.0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union

import torch

Logits = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = ["RouterLoss", "balance_loss", "probabilities", "routing"]


def _layers(router_logits: Logits) -> list[torch.Tensor]:
    if isinstance(router_logits, torch.Tensor):
        return [router_logits] if router_logits.dim() == 2 else list(router_logits)
    layers = [t for t in router_logits if t is not None]
    if not layers:
        raise ValueError("router_logits holds no layer: give each MoE layer's [tokens, experts] logits")
    return layers


def _rows_mask(mask: Optional[torch.Tensor], rows: int, device: torch.device) -> Optional[torch.Tensor]:
    if mask is None:
        return None
    flat = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if flat.numel() != rows:
        raise ValueError(f"the token mask has {flat.numel()} entries for {rows} rows of router logits: give the "
                         "attention mask of the micro-batch the logits came from ([batch, sequence])")
    return flat


def routing(router_logits: Logits, top_k: int, mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k assignments per expert and rows (tokens x layers), padding masked out: the
    counts of ``transformers``' ``load_balancing_loss_func``, summed rather than averaged,
    on the device and without gradient.

    >>> routing(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), top_k=1, mask=torch.tensor([1, 0]))[0].tolist()
    [1.0, 0.0]
    """
    layers = _layers(router_logits)
    experts = layers[0].shape[-1]
    device = layers[0].device
    with torch.no_grad():
        assigned = torch.zeros(experts, dtype=torch.float64, device=device)
        rows = torch.zeros((), dtype=torch.float64, device=device)
        for layer in layers:
            logits = layer.detach().reshape(-1, experts)
            weight = _rows_mask(mask, logits.shape[0], device)
            chosen = torch.topk(torch.softmax(logits.float(), dim=-1), top_k, dim=-1).indices.reshape(-1)
            ones = torch.ones_like(chosen, dtype=torch.float64) if weight is None else \
                weight.repeat_interleave(top_k).to(torch.float64)
            assigned.scatter_add_(0, chosen, ones)
            rows += logits.shape[0] if weight is None else weight.sum().to(torch.float64)
    return assigned, rows


def probabilities(router_logits: Logits, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each expert's routing probability summed over rows (tokens x layers), padding masked
    out: the differentiable factor of the load-balancing loss.

    >>> probabilities(torch.zeros(3, 2)).tolist()
    [1.5, 1.5]
    """
    total: Optional[torch.Tensor] = None
    for layer in _layers(router_logits):
        logits = layer.reshape(-1, layer.shape[-1])
        probs = torch.softmax(logits.float(), dim=-1)
        weight = _rows_mask(mask, logits.shape[0], logits.device)
        layer_sum = (probs if weight is None else probs * weight.unsqueeze(-1)).sum(0)
        total = layer_sum if total is None else total + layer_sum
    assert total is not None
    return total


def balance_loss(probability_sums: torch.Tensor, assigned: torch.Tensor, rows: Any, num_experts: int) -> torch.Tensor:
    """``E * sum_e assigned_e * P_e / rows^2``: with one micro-batch's ``probability_sums``
    and the window's ``assigned`` and ``rows``, that micro-batch's share of the window's
    load-balancing loss, exact in value and gradient when the shares are summed.

    >>> float(balance_loss(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0]), 2.0, 2))
    1.0
    """
    rows = torch.as_tensor(rows, dtype=torch.float64, device=probability_sums.device)
    factor = assigned.to(device=probability_sums.device, dtype=torch.float64) / rows.clamp(min=1.0) ** 2
    return num_experts * (probability_sums * factor.to(probability_sums.dtype)).sum()


@dataclasses.dataclass
class RouterLoss:
    """A load-balancing term for ``Accumulator(terms=...)`` in your own loop and MoE layer.

    Args:
        route: ``micro_batch -> router_logits`` or ``(router_logits, mask)``: the routing of a
            micro-batch, run without gradients when its window opens (under the window's
            autocast, the RNG state kept and replayed for its training forward). Usually
            ``lambda b: model(**b).router_logits`` or a cheaper pass up to the last router.
        num_experts: E, experts per MoE layer.
        top_k: experts each token is routed to.
        coef: the loss's coefficient (``router_aux_loss_coef``).

    In the training forward, hand the same micro-batch's router logits (with their graph) to
    ``window.backward({..., "router": (router_logits, mask)})``.

    Example:
        >>> router = RouterLoss(lambda b: model(**b).router_logits, num_experts=8, top_k=2, coef=0.01)  # doctest: +SKIP
        >>> acc = gradaccum.Accumulator(model, opt, steps=4, terms={"lm": count_tokens, "router": router})  # doctest: +SKIP
    """

    route: Callable[[Any], Any]
    num_experts: int
    top_k: int = 2
    coef: float = 1.0

    def __post_init__(self) -> None:
        if not callable(self.route):
            raise TypeError("RouterLoss(route=...) must be a function micro_batch -> router_logits (or (logits, mask))")
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RouterLoss({name}=...) must be a positive int; got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"RouterLoss: top_k={self.top_k} exceeds num_experts={self.num_experts}")

    def counted(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The micro-batch's assignments and rows, from ``route`` without gradients."""
        with torch.no_grad():
            logits, mask = split(self.route(batch))
        return routing(logits, self.top_k, mask)


def split(value: Any) -> tuple[Logits, Optional[torch.Tensor]]:
    """``(router_logits, mask)`` from what a route function or ``window.backward`` was given:
    the logits alone, or a pair whose second item is the token mask (an integer or bool
    tensor, as attention masks are; a float second item is a layer's logits)."""
    if isinstance(value, tuple) and len(value) == 2 and (
            value[1] is None or (isinstance(value[1], torch.Tensor) and not value[1].is_floating_point())):
        return value[0], value[1]
    return value, None
