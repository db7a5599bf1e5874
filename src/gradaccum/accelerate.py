"""Hugging Face Accelerate: ``accelerator.backward(loss, num_items=n)`` with the big batch's update.

``Accelerator.backward`` divides every micro-batch loss by ``gradient_accumulation_steps``:
the mean of micro-batch means, which is not the mean over the window's items when micro-
batches hold different numbers of tokens, and which gives the last, partial window of an
epoch only a fraction of its gradient. :class:`ExactAccelerator` is an ``Accelerator``
whose ``backward`` weighs each micro-batch's mean loss by its item count instead. When the
window closes (``accelerator.sync_gradients``), right after the synchronising backward, it
divides the window's gradient by the window's items over all ranks. Clipping with
``accelerator.clip_grad_norm_`` and ``optimizer.step()`` then see the big batch's gradient.
Everything else is the stock ``Accelerator``: one gradient all-reduce per window (plus one
small all-reduce of the item count).

Example:
    >>> from gradaccum.accelerate import ExactAccelerator  # doctest: +SKIP
    >>> accelerator = ExactAccelerator(gradient_accumulation_steps=4)  # instead of Accelerator  # doctest: +SKIP
    >>> for batch in loader:  # doctest: +SKIP
    ...     with accelerator.accumulate(model):
    ...         loss = model(**batch).loss
    ...         accelerator.backward(loss, num_items=int((batch["labels"] != -100).sum()))
    ...         optimizer.step(); scheduler.step(); optimizer.zero_grad()
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import accelerate
import torch
from accelerate.utils import DistributedType

from ._weights import Tally
from .engine.termgrads import TermWindow

__all__ = ["ExactAccelerator"]


class ExactAccelerator(accelerate.Accelerator):
    """``accelerate.Accelerator`` whose ``backward(loss, num_items=n)`` is exact under accumulation.

    ``loss`` is the micro-batch's mean over its ``n`` items (tokens, samples). Without
    ``num_items`` every micro-batch of a window weighs the same, and a partial window is
    still a mean over what it holds. Takes the ``Accelerator``'s arguments.

    Under Accelerate's DeepSpeed plugin (ZeRO 0-3) the engine's own adapter does the
    DeepSpeed part (``gradaccum.engine.deepspeed``): each backward is DeepSpeed's with the
    micro-batch's weight instead of 1/k, and the window's scale reaches the engine before
    its step, so DeepSpeed's clipping (the config's ``gradient_clipping``) and its update
    see the window's gradient. Megatron-LM is refused at the first ``backward``.

    Example:
        >>> accelerator = ExactAccelerator(gradient_accumulation_steps=8)  # doctest: +SKIP
        >>> accelerator.backward(out.loss, num_items=n_tokens)  # doctest: +SKIP
    """

    def __init__(self, *args: Any, terms: Optional[list[str]] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The window's counts and weights (gradaccum._weights): the same arithmetic as every
        # other loop's. Saved and restored with save_state()/load_state().
        self.tally = Tally()
        self.register_for_checkpointing(self.tally)
        self._term_names = list(terms) if terms is not None else None
        self._terms: Optional[TermWindow] = None
        self.last_window_items: Optional[float] = None
        self.last_window_terms: Optional[dict[str, float]] = None
        self._params: Optional[tuple[int, list]] = None  # the parameters to rescale, found once
        self._ds: Any = None  # the engine's DeepSpeed adapter, made at the first backward under DeepSpeed
        self._term_counts: list[float] = []

    def backward(self, loss: Any, num_items: Any = None, **kwargs: Any) -> None:
        """Backpropagate the micro-batch's mean ``loss`` weighted by its ``num_items``; on the
        window's last micro-batch, leave the window's mean gradient in ``.grad``.

        ``loss`` may be a mapping ``{term: (mean, num_items)}`` for a loss with several
        denominators (each term a mean over its own items): the first term goes through
        this backward, each other one into a gradient store of its own (one more backward
        per term), and the window's gradient is ``sum_t`` of each term's mean gradient.

        Example:
            >>> accelerator.backward(loss, num_items=len(labels))  # doctest: +SKIP
            >>> accelerator.backward({"lm": (lm_mean, n_tokens), "cls": (cls_mean, n_rows)})  # doctest: +SKIP
        """
        if self.distributed_type == DistributedType.MEGATRON_LM:
            raise NotImplementedError(
                "ExactAccelerator under Megatron-LM: that engine scales the loss by the accumulation steps "
                "itself; use DDP, FSDP or DeepSpeed through Accelerate, or gradaccum.Accumulator"
            )
        weight: float = 0.0
        if isinstance(loss, Mapping):
            if num_items is not None:
                raise ValueError("num_items with a mapping of terms: give each term's count inside it, {name: (mean, n)}")
            loss, num_items = self._term_window().split(loss, self.scaler.scale if self.scaler is not None else None)
            if num_items is not None:
                weight = self.tally.add(num_items)
        else:
            weight = self.tally.add(num_items)
        if self.distributed_type == DistributedType.DEEPSPEED:
            self._deepspeed_backward(loss, weight)
            return
        scaled = loss * weight
        if self.scaler is not None:
            self.scaler.scale(scaled).backward(**kwargs)
        else:
            scaled.backward(**kwargs)
        if self.sync_gradients:
            self._close_window()

    def _term_window(self) -> TermWindow:
        if self._terms is None:
            if self.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
                raise ValueError(
                    f"a mapping of terms under Accelerate's {self.distributed_type.value}, which reduces or shards the "
                    "gradient inside every backward, so no term can be held apart. Use DDP (or one process), or "
                    "gradaccum.Accumulator(terms={name: counter}), which counts terms ahead under FSDP2 and DeepSpeed")
            params = [p for model in self._models for p in model.parameters()]
            self._terms = TermWindow(params, self._term_names, self._world(), "ExactAccelerator.backward")
        return self._terms

    def _deepspeed_backward(self, loss: torch.Tensor, weight: float) -> None:
        """One micro-batch through the engine's DeepSpeed adapter; at the close, the window's
        scale and then ``engine.step()`` (which clips and updates), as Accelerate's wrapper would."""
        adapter = self._deepspeed_adapter()
        if self.tally.micro_batches == 1:
            adapter.begin_window()  # ZeRO-2: one reduction for the window, at its close
        adapter.engine.set_gradient_accumulation_boundary(self.sync_gradients)
        adapter.backward(loss, weight)
        if self.sync_gradients:
            adapter.scale_window(self._window_factor())
            adapter.update(None)

    def _deepspeed_adapter(self) -> Any:
        engine = self.deepspeed_engine_wrapped.engine
        if self._ds is None or self._ds.engine is not engine:
            from .engine.deepspeed import DeepSpeed

            self._ds = DeepSpeed(engine)
            # Accelerate's k is DeepSpeed's gradient_accumulation_steps: no notice about it.
            self._ds.configure(None, False, notice=False)
        return self._ds

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2) -> Optional[torch.Tensor]:
        """Clip the window's gradient, once, when the window closes (``sync_gradients``); a
        no-op returning ``None`` on the other micro-batches, whose ``.grad`` holds a running,
        not yet rescaled sum that clipping would distort. Call it every micro-batch, as
        Accelerate's examples do, or only under ``if accelerator.sync_gradients:``.

        Example:
            >>> norm = accelerator.clip_grad_norm_(model.parameters(), 1.0)  # doctest: +SKIP
        """
        if not self.sync_gradients:
            return None
        if self.distributed_type == DistributedType.DEEPSPEED:
            configured = float(self.deepspeed_engine_wrapped.engine.gradient_clipping() or 0.0)
            if not math.isclose(configured, float(max_norm)):
                raise ValueError(
                    f"clip_grad_norm_(..., {max_norm}) under DeepSpeed, whose engine clips the window's gradient "
                    f"inside backward at its config's \"gradient_clipping\": {configured}. Set that key (or "
                    f"DeepSpeedPlugin(gradient_clipping={max_norm})) instead"
                )
        return super().clip_grad_norm_(parameters, max_norm, norm_type)

    @staticmethod
    def _world() -> int:
        # The process group's size: under DeepSpeed on CPUs Accelerate reports one process.
        return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1

    def _window_factor(self) -> float:
        """What the held gradient is multiplied by to be the window's mean; closes the window
        (one small all-reduce of the window's counts, the terms' with them). With terms, their
        stores are added by :meth:`_add_terms` once ``.grad`` is scaled."""
        world = self._world()
        local = self.tally.local() + (self._terms.local() if self._terms is not None else [])
        if world > 1:
            counts = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(self.device) for v in local])
            # torch.distributed itself: Accelerate's reduce() returns the tensor unsummed under DeepSpeed.
            torch.distributed.all_reduce(counts)
            summed = counts.tolist()
        else:  # nothing to sum with
            summed = [float(v) for v in local]
        self._term_counts = summed[3:]
        if not summed[0]:  # no micro-batch had the primary term: .grad holds zeros only
            self.tally.items, self.tally.micro_batches, self.tally.loss_sum, self.tally.weighted = 0.0, 0, 0.0, None
            self.last_window_items = 0.0
            return 0.0
        closed = self.tally.close(summed[:3], world)
        self.last_window_items = closed.items
        return closed.factor

    def _close_window(self) -> None:
        self._scale_params(self._window_factor())
        if self._terms is not None:  # each other term's store, at its exact 1 / N_t
            self.last_window_terms = self._terms.close(self._term_counts, _sum_over_ranks if self._world() > 1 else None)

    def _scale_params(self, factor: float) -> None:
        prepared = len(self._optimizers) + len(self._models)
        if self._params is None or self._params[0] != prepared:  # found again only after another prepare()
            params = {id(p): p for opt in self._optimizers for group in opt.param_groups for p in group["params"]}
            params.update((id(p), p) for model in self._models for p in model.parameters())
            self._params = (prepared, list(params.values()))
        with torch.no_grad():
            grads = [p.grad for p in self._params[1] if p.grad is not None]
            if grads and factor != 1.0:
                torch._foreach_mul_(grads, factor)


def _sum_over_ranks(flat: torch.Tensor) -> torch.Tensor:
    torch.distributed.all_reduce(flat)
    return flat
