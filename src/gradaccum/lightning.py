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

from typing import Any, Mapping, Optional

import lightning.pytorch as pl
import torch

from ._weights import Tally
from .engine.termgrads import TermWindow

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

    def __init__(self, terms: Optional[list[str]] = None) -> None:
        # The window's counts and weights (gradaccum._weights): the same arithmetic as every
        # other loop's; saved in Lightning's checkpoints with the callback's state.
        self.tally = Tally()
        self._term_names = list(terms) if terms is not None else None
        self._terms: Optional[TermWindow] = None
        self._weight: Optional[float] = None
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
                module._gradaccum_callback._take(module.trainer, out)
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

    def _take(self, trainer: "pl.Trainer", out: Any) -> None:
        loss = out.get("loss") if isinstance(out, dict) else out
        if isinstance(loss, Mapping):  # several terms: the first goes to Lightning's backward
            if out.get("num_items") is not None:
                raise ValueError("num_items beside a mapping of terms: give each term's count inside it, {name: (mean, n)}")
            mean, n = self._term_window(trainer).split(loss)
            out["loss"] = mean
            self._weight = self.tally.add(n, mean.detach().double()) if n is not None else 0.0
            return
        n = out.get("num_items") if isinstance(out, dict) else None
        # The loss sum is kept a tensor: reading it here would wait for the device at every micro-batch.
        self._weight = self.tally.add(n, loss.detach().double() if isinstance(loss, torch.Tensor) else None)

    def _term_window(self, trainer: "pl.Trainer") -> TermWindow:
        if self._terms is None:
            from lightning.pytorch import strategies

            if not isinstance(trainer.strategy, (strategies.SingleDeviceStrategy, strategies.DDPStrategy)) or \
                    isinstance(trainer.strategy, (strategies.FSDPStrategy, strategies.DeepSpeedStrategy)):
                raise ValueError(
                    f"a mapping of terms under {type(trainer.strategy).__name__}, which reduces or shards the gradient "
                    "inside every backward, so no term can be held apart. Use one device or DDP, or "
                    "gradaccum.Accumulator(terms={name: counter}) in a manual-optimization training_step")
            if getattr(trainer.precision_plugin, "scaler", None) is not None:
                raise ValueError(
                    "a mapping of terms with a loss scaler (precision='16-mixed'): Lightning unscales the gradient "
                    "before the callback can add the other terms. Use precision='bf16-mixed' or 32")
            params = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
            self._terms = TermWindow(params, self._term_names, trainer.world_size, "ExactAccumulation")
        return self._terms

    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self._weight is None:
            raise RuntimeError("ExactAccumulation saw a backward without a training_step output: is training_step overridden after setup?")
        # Lightning hands backward the loss divided by k (DeepSpeed's backward divides by its
        # accumulation steps again); the hook makes the seed the tally's weight instead.
        factor = trainer.accumulate_grad_batches * self._weight
        if self._deepspeed is not None:
            factor *= self._deepspeed.engine.gradient_accumulation_steps()
        if loss.requires_grad and factor != 1.0:
            loss.register_hook(lambda g: g * factor)
        self._weight = None

    # -- the window's end ----------------------------------------------------------------

    def on_before_optimizer_step(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any) -> None:
        ds = self._deepspeed
        if ds is not None and not ds.engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed's step is called every micro-batch and updates only at its boundary
        terms = self._terms
        local = self.tally.local() + (terms.local() if terms is not None else [])
        counts = torch.stack([torch.as_tensor(v, dtype=torch.float64).reshape(()).to(pl_module.device) for v in local])
        if trainer.world_size > 1:  # the strategy's own collective: one small all-reduce
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        summed = counts.tolist()
        factor, loss = 0.0, 0.0
        if summed[0]:  # else no micro-batch had the primary term: .grad holds zeros only
            closed = self.tally.close(summed[:3], trainer.world_size)
            factor, loss = closed.factor, closed.loss
        else:
            self.tally.items, self.tally.micro_batches, self.tally.loss_sum, self.tally.weighted = 0.0, 0, 0.0, None
        if ds is not None:
            ds.scale_window(factor)  # ZeRO: through the loss scale its step divides by
        else:
            with torch.no_grad():
                grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
                if grads and factor != 1.0:
                    torch._foreach_mul_(grads, factor)
        if terms is not None:  # each other term's store, at its exact 1 / N_t
            reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if trainer.world_size > 1 else None
            means = terms.close(summed[3:], reduce)
            loss = sum(means.values())
            for name, value in means.items():
                pl_module.log(f"train_loss/{name}", value, on_step=True, on_epoch=False, sync_dist=False)
        pl_module.log("train_loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=False)

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._deepspeed is not None:
            self._deepspeed.reset_scale()  # DeepSpeed stepped (or not): the next backwards are unscaled

    # -- checkpoints -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.tally.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tally.load_state_dict(state_dict)


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
