"""PyTorch Lightning: ``Trainer(accumulate_grad_batches=k)`` with the big batch's update.

Lightning divides every micro-batch loss by ``accumulate_grad_batches``: the mean of
micro-batch means, which is not the mean over the window's items when micro-batches hold
different numbers of tokens, and which gives the last, partial window of an epoch a
fraction of its gradient (Lightning issue #19987). :class:`ExactAccumulation` is a
callback; the ``LightningModule`` returns its micro-batch's item count beside the loss:

    def training_step(self, batch, batch_idx):
        loss = self(batch).loss                        # the mean over this micro-batch's items
        return {"loss": loss, "num_items": n_tokens}

The callback replaces the 1/k that reaches each backward by n_i / r (r: the last window's
items per micro-batch over all ranks, the same on every rank), and before the optimizer
step, and so before Lightning's gradient clipping, multiplies the window's gradient by
r x world / N, N being the window's items over all ranks (one small all-reduce). Everything
else (no-sync micro-batches under DDP, clipping, precision, checkpoints) stays Lightning's.

Example:
    >>> from gradaccum.lightning import ExactAccumulation  # doctest: +SKIP
    >>> trainer = Trainer(accumulate_grad_batches=4, callbacks=[ExactAccumulation()])  # doctest: +SKIP
"""

from __future__ import annotations

import math
import typing
from typing import Any, Optional

import lightning.pytorch as pl
import torch

__all__ = ["ExactAccumulation"]


class ExactAccumulation(pl.Callback):
    """Make ``accumulate_grad_batches`` give the big batch's gradient, weighted by ``num_items``.

    ``training_step`` returns ``{"loss": mean_loss, "num_items": n}``; without
    ``num_items`` every micro-batch of a window weighs the same, and a partial last window
    is still a mean. Logs ``train_loss``: the window's item-weighted mean loss.

    Strategies: one device, DDP (any launcher), ``FSDPStrategy`` (its sharded gradients
    are scaled where they are: the scale is one number) and ``DeepSpeedStrategy`` (the
    window's scale goes through the engine's DeepSpeed adapter at DeepSpeed's boundary;
    stock Lightning divides by k twice there, once itself and once in DeepSpeed's backward).
    Refused at ``fit`` with a clear error: any other strategy,
    ``GradientAccumulationScheduler`` (k changing by epoch), manual optimization, and more
    than one optimizer.

    Example:
        >>> trainer = Trainer(accumulate_grad_batches=8, gradient_clip_val=1.0,  # doctest: +SKIP
        ...                   callbacks=[ExactAccumulation()])
    """

    def __init__(self) -> None:
        self._reference = 1.0  # the same on every rank (see the module docstring)
        self._items = 0.0
        self._loss_sum: Any = 0.0  # a tensor once a loss is seen
        self._micro_batches = 0
        self._n: Optional[float] = None
        self._weighted: Optional[bool] = None
        self._deepspeed: Any = None  # the engine's DeepSpeed adapter, under DeepSpeedStrategy

    # -- checks ---------------------------------------------------------------------

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        _check_strategy(trainer.strategy)
        from lightning.pytorch.callbacks import GradientAccumulationScheduler

        if any(isinstance(cb, GradientAccumulationScheduler) for cb in getattr(trainer, "callbacks", [])):
            raise ValueError(
                "ExactAccumulation with GradientAccumulationScheduler: a k that changes by epoch is not "
                "supported; give Trainer(accumulate_grad_batches=k), or use gradaccum.Accumulator(steps=callable)"
            )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "ExactAccumulation works with automatic optimization; under manual optimization use "
                "gradaccum.Accumulator in training_step instead"
            )
        # Read the item count that training_step returns, before Lightning backpropagates.
        # The wrapper reports to the module's current callback (a module may be fit again).
        module: Any = pl_module
        module._gradaccum_callback = self
        step = module.training_step
        if not getattr(step, "_gradaccum_wrapped", False):
            def training_step(*args: Any, **kwargs: Any) -> Any:
                out = step(*args, **kwargs)
                module._gradaccum_callback._take(out)
                return out

            training_step._gradaccum_wrapped = True  # type: ignore[attr-defined]
            module.training_step = training_step

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"ExactAccumulation supports one optimizer; this module configures {len(trainer.optimizers)}")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy):
            from .engine.deepspeed import DeepSpeed

            self._deepspeed = DeepSpeed(trainer.strategy.deepspeed_engine)

    # -- each micro-batch --------------------------------------------------------------

    def _take(self, out: Any) -> None:
        n = out.get("num_items") if isinstance(out, dict) else None
        weighted = n is not None
        if self._weighted is not None and weighted != self._weighted:
            raise ValueError("num_items was returned for some micro-batches of a window and not for others: return it always or never")
        self._weighted = weighted
        n = float(n.item() if isinstance(n, torch.Tensor) else typing.cast(float, n)) if weighted else 1.0
        if not math.isfinite(n) or n <= 0:
            raise ValueError(f"num_items must be a positive number of items the loss averages over; got {n!r}")
        loss = out.get("loss") if isinstance(out, dict) else out
        self._n = n
        if isinstance(loss, torch.Tensor):
            # Kept a tensor: reading it here would wait for the device at every micro-batch.
            self._loss_sum = self._loss_sum + loss.detach().double() * n

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self._n is None:
            raise RuntimeError("ExactAccumulation saw a backward without a training_step output: is training_step overridden after setup?")
        # Lightning hands backward the loss divided by k (DeepSpeed's backward divides by its
        # accumulation steps again); the hook makes the seed n / r instead.
        factor = trainer.accumulate_grad_batches * self._n / self._reference
        if self._deepspeed is not None:
            factor *= self._deepspeed.engine.gradient_accumulation_steps()
        if loss.requires_grad and factor != 1.0:
            loss.register_hook(lambda g: g * factor)
        self._items += self._n
        self._micro_batches += 1
        self._n = None

    # -- the window's end ----------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        ds = self._deepspeed
        if ds is not None and not ds.engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed's step is called every micro-batch and updates only at its boundary
        loss_sum = torch.as_tensor(self._loss_sum, dtype=torch.float64, device=pl_module.device).reshape(1)
        counts = torch.cat([torch.tensor([self._items, float(self._micro_batches)], dtype=torch.float64,
                                         device=pl_module.device), loss_sum])
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        items, micro_batches, loss_sum = counts.tolist()
        factor = self._reference * trainer.world_size / items
        if ds is not None:
            ds.scale_window(factor)  # ZeRO: through the loss scale its step divides by
        else:
            with torch.no_grad():
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                if grads and factor != 1.0:
                    torch._foreach_mul_(grads, factor)
        pl_module.log("train_loss", loss_sum / items, on_step=True, on_epoch=False, prog_bar=True, sync_dist=False)
        self._reference = items / micro_batches
        self._items, self._loss_sum, self._micro_batches, self._weighted = 0.0, 0.0, 0, None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._deepspeed is not None:
            self._deepspeed.reset_scale()  # DeepSpeed stepped (or not): the next backwards are unscaled

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self._reference}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._reference = float(state_dict.get("reference", 1.0))


def _check_strategy(strategy: Any) -> None:
    """Refuse a strategy under which the callback's two hooks cannot make the update exact."""
    from lightning.pytorch import strategies

    supported = (strategies.SingleDeviceStrategy, strategies.DDPStrategy, strategies.FSDPStrategy)  # DeepSpeed's too
    if not isinstance(strategy, supported):
        raise ValueError(
            f"ExactAccumulation under {type(strategy).__name__}: supported are one device, DDP, FSDPStrategy and "
            "DeepSpeedStrategy, where the callback's scale can reach the window's gradient before the update. "
            "Use one of those, or gradaccum.Accumulator in a manual-optimization training_step"
        )
