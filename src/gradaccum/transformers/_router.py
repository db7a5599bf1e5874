"""The router load-balancing loss of MoE models under :class:`ExactAccumulationMixin`.

With ``output_router_logits`` and a non-zero ``router_aux_loss_coef`` the model (or TRL's
``SFTTrainer``) adds ``coef x aux`` to each micro-batch's loss, ``aux`` computed over that
micro-batch alone (``gradaccum.moe`` says why that is not the window's). Here, when the
window's batches are known (``get_batch_samples``), a forward without gradients over each
counts its top-k assignments and rows, with its RNG state kept; the window's totals are
summed over ranks. Each micro-batch's training forward then runs from its kept RNG state
(dropout and router jitter route alike), and its loss becomes the model's mean loss at its
share of the window plus ``coef`` x its surrogate share of the window's aux (``moe.balance_loss``).
The training pass's own routing is compared with the counted one; a window where they
differ is refused at its last micro-batch, before its update.

The training forward's router logits are taken by forward hooks on the family's router
modules (the ones ``transformers`` records ``router_logits`` from), not from the outputs:
TRL's ``SFTTrainer`` recomputes its outputs without gradients when asked for them, and its
fused head never returns router logits. The micro-batch's own aux is rebuilt from them with
the same formula (``moe.balance_loss`` of its own counts), so it can be taken out of the loss.
"""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..engine import rng
from ..moe import balance_loss, probabilities, routing

_FORWARD_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds", "token_type_ids")


def router_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, int]]:
    """The modules whose output (at the index given) is a layer's router logits, as
    ``transformers`` records them (``_can_record_outputs["router_logits"]``)."""
    targets = []
    for module in model.modules():
        recorder = (getattr(module, "_can_record_outputs", None) or {}).get("router_logits")
        if recorder is not None and getattr(recorder, "target_class", None) is not None:
            targets.append((recorder.target_class, int(getattr(recorder, "index", 0) or 0)))
    found = [(m, index) for m in model.modules() for cls, index in targets[:1] if isinstance(m, cls)]
    return found


def spec(trainer: Any) -> Optional[tuple[int, int, float]]:
    """(experts, top-k, coefficient) when the trainer's model adds a router loss, else None."""
    model = trainer.model
    config = getattr(model, "config", None)
    coef = getattr(trainer, "router_aux_loss_coef", None)  # TRL's trainers keep their own
    if coef is None:
        coef = getattr(model, "router_aux_loss_coef", getattr(config, "router_aux_loss_coef", 0.0))
    if not getattr(config, "output_router_logits", False) or not coef:
        return None
    experts = getattr(model, "num_experts", None) or getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(model, "num_experts_per_tok", None) or getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        raise ValueError(
            f"{type(model).__name__} returns router logits (output_router_logits) with router_aux_loss_coef={coef}, "
            "but says neither num_experts nor num_experts_per_tok: the router loss cannot be made exact without them")
    return int(experts), int(top_k), float(coef)


class WindowRouting:
    """One window's routing: counted ahead, replayed, checked."""

    def __init__(self, experts: int, top_k: int, coef: float):
        self.experts, self.top_k, self.coef = experts, top_k, coef
        self.counted: dict[int, torch.Tensor] = {}
        self.rng: dict[int, tuple] = {}
        self.totals: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.mismatch: Optional[torch.Tensor] = None
        self.left = 0
        self.current: Optional[int] = None  # the micro-batch in its training step (its batch as counted)
        self.tokens_per_expert: Optional[list[float]] = None
        self.captured: list[torch.Tensor] = []

    @contextlib.contextmanager
    def capture(self, model: torch.nn.Module):
        """The router logits of the forward run inside, with their graph (forward hooks)."""
        modules = router_modules(model)
        if not modules:
            raise ValueError(
                f"{type(model).__name__} adds a router loss but names no router module that transformers records "
                "router_logits from (_can_record_outputs): its router loss cannot be made exact here. Set "
                "router_aux_loss_coef=0, or train it with gradaccum.Accumulator and gradaccum.moe.RouterLoss")
        self.captured = []

        def hook(module: torch.nn.Module, args: Any, output: Any, index: int = 0) -> None:
            logits = output[index] if isinstance(output, (tuple, list)) else output
            self.captured.append(logits)

        handles = [m.register_forward_hook(lambda mod, a, out, i=index: hook(mod, a, out, i)) for m, index in modules]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def count(self, trainer: Any, batches: list, world: int) -> None:
        """The window's assignments and rows, before its first backward (all ranks)."""
        if trainer.compute_loss_func is not None:
            raise ValueError("compute_loss_func with a router loss: the mixin splits the model's own loss from its "
                             "router loss to make both exact; drop compute_loss_func, or router_aux_loss_coef")
        model = trainer.model
        device = trainer.args.device
        assigned = torch.zeros(self.experts, dtype=torch.float64, device=device)
        rows = torch.zeros((), dtype=torch.float64, device=device)
        self.counted, self.rng = {}, {}
        was_training = model.training
        model.train()
        for batch in batches:
            inputs = trainer._prepare_inputs(batch)
            self.rng[id(batch)] = rng.state(device)
            forward = {k: inputs[k] for k in _FORWARD_KEYS if k in inputs}
            # The training forward's autocast, and its train mode: the same routing.
            with torch.no_grad(), trainer.compute_loss_context_manager():
                out = model(**forward, output_router_logits=True, use_cache=False)
            a, r = routing(out.router_logits, self.top_k, forward.get("attention_mask"))
            self.counted[id(batch)] = a
            assigned += a.to(device)
            rows += r.to(device)
        model.train(was_training)
        totals = torch.cat([assigned, rows.reshape(1)])
        if world > 1:
            dist.all_reduce(totals)
        self.totals = (totals[:-1], totals[-1])
        self.mismatch = torch.zeros((), dtype=torch.float64, device=device)
        self.left = len(batches)
        self.tokens_per_expert = None

    @contextlib.contextmanager
    def replay(self, inputs: Any, device: torch.device):
        """The micro-batch's training step, from the RNG state its counting forward started at."""
        state = self.rng.get(id(inputs))
        if state is not None:
            rng.restore(state, device)
        self.current = id(inputs)  # compute_loss sees the prepared copy: name the batch as counted
        try:
            yield
        finally:
            self.current = None

    def exact(self, loss: torch.Tensor, inputs: Any, weight: float, world: int) -> torch.Tensor:
        """The micro-batch's loss as its share of the window's: the model's mean at ``weight``,
        plus ``coef`` x its surrogate share of the window's router loss (x the ranks DDP averages).
        ``loss`` is what the model (or trainer) returned: its mean plus ``coef`` x its own aux."""
        logits = self.captured
        if not logits or self.totals is None or not logits[0].requires_grad:
            raise RuntimeError("the training forward's router logits were not captured with their graph, though the model "
                               "adds a router loss: exact router losses need them (output_router_logits=True)")
        mask = inputs.get("attention_mask")
        probs = probabilities(logits, mask)
        own = routing(logits, self.top_k, mask)
        # The micro-batch's own aux, as load_balancing_loss_func computes it (value and gradient): taken out.
        main = loss - self.coef * balance_loss(probs, own[0], own[1], self.experts).to(loss.dtype)
        share = balance_loss(probs, self.totals[0], self.totals[1], self.experts)
        assert self.mismatch is not None
        counted = self.counted.get(self.current) if self.current is not None else None
        if counted is not None:
            self.mismatch += (own[0] - counted.to(self.mismatch.device)).abs().sum()
        self.left -= 1
        if self.left == 0:  # the window's last micro-batch: one read, before its backward
            mismatch = float(self.mismatch)
            self.tokens_per_expert = self.totals[0].tolist()
            if mismatch:
                raise RuntimeError(
                    f"the training forward routed {mismatch:.0f} token-expert assignment(s) of this window differently "
                    "from the counting forward, whose counts the router loss was weighed by; the window is not "
                    "applied. Something random that the replayed RNG does not cover differs between the passes (a "
                    "nondeterministic kernel, randomness from another generator); make it deterministic")
        return main * weight + self.coef * share.to(main.dtype) * world
