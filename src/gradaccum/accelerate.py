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
from typing import Any, Optional

import accelerate
import torch
from accelerate.utils import DistributedType

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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._items = 0.0  # this rank's items in the open window
        self._micro_batches = 0
        # Provisional weights are n / reference; the reference must be the same on every
        # rank, since DDP averages before the window's total is known: the last window's
        # global items per micro-batch (1 before the first window closes).
        self._reference = 1.0
        self._weighted: Optional[bool] = None
        self.last_window_items: Optional[float] = None
        self._params: Optional[tuple[int, list]] = None  # the parameters to rescale, found once
        self._ds: Any = None  # the engine's DeepSpeed adapter, made at the first backward under DeepSpeed

    def backward(self, loss: torch.Tensor, num_items: Any = None, **kwargs: Any) -> None:
        """Backpropagate the micro-batch's mean ``loss`` weighted by its ``num_items``; on the
        window's last micro-batch, leave the window's mean gradient in ``.grad``.

        Example:
            >>> accelerator.backward(loss, num_items=len(labels))  # doctest: +SKIP
        """
        if self.distributed_type == DistributedType.MEGATRON_LM:
            raise NotImplementedError(
                "ExactAccelerator under Megatron-LM: that engine scales the loss by the accumulation steps "
                "itself; use DDP, FSDP or DeepSpeed through Accelerate, or gradaccum.Accumulator"
            )
        weighted = num_items is not None
        if self._weighted is not None and weighted != self._weighted:
            raise ValueError("num_items was given for some micro-batches of this window and not for others: give it always or never")
        self._weighted = weighted
        n = float(num_items.item() if isinstance(num_items, torch.Tensor) else num_items) if weighted else 1.0
        if not math.isfinite(n) or n <= 0:
            raise ValueError(f"num_items must be a positive number of items the loss averages over; got {num_items!r}")
        self._items += n
        self._micro_batches += 1
        if self.distributed_type == DistributedType.DEEPSPEED:
            self._deepspeed_backward(loss, n / self._reference)
            return
        scaled = loss * (n / self._reference)
        if self.scaler is not None:
            self.scaler.scale(scaled).backward(**kwargs)
        else:
            scaled.backward(**kwargs)
        if self.sync_gradients:
            self._close_window()

    def _deepspeed_backward(self, loss: torch.Tensor, weight: float) -> None:
        """One micro-batch through the engine's DeepSpeed adapter; at the close, the window's
        scale and then ``engine.step()`` (which clips and updates), as Accelerate's wrapper would."""
        adapter = self._deepspeed_adapter()
        if self._micro_batches == 1:
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

    def _window_factor(self) -> float:
        """What the held gradient is multiplied by to be the window's mean; closes the window."""
        # The process group's size: under DeepSpeed on CPUs Accelerate reports one process.
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world > 1:
            counts = torch.tensor([self._items, float(self._micro_batches)], dtype=torch.float64, device=self.device)
            # torch.distributed itself: Accelerate's reduce() returns the tensor unsummed under DeepSpeed.
            torch.distributed.all_reduce(counts)
            items, micro_batches = counts.tolist()
        else:  # nothing to sum with: no tensor, no copy
            items, micro_batches = self._items, float(self._micro_batches)
        # Held: sum over ranks and micro-batches of n_i g_i / reference, averaged over ranks by DDP.
        factor = self._reference * world / items
        self.last_window_items = items
        self._reference = items / micro_batches
        self._items, self._micro_batches, self._weighted = 0.0, 0, None
        return factor

    def _close_window(self) -> None:
        factor = self._window_factor()
        prepared = len(self._optimizers) + len(self._models)
        if self._params is None or self._params[0] != prepared:  # found again only after another prepare()
            params = {id(p): p for opt in self._optimizers for group in opt.param_groups for p in group["params"]}
            params.update((id(p), p) for model in self._models for p in model.parameters())
            self._params = (prepared, list(params.values()))
        with torch.no_grad():
            grads = [p.grad for p in self._params[1] if p.grad is not None]
            if grads and factor != 1.0:
                torch._foreach_mul_(grads, factor)
