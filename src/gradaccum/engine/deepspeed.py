"""DeepSpeed: an engine that owns its gradients, as one more data-parallel adapter.

What ``deepspeed.initialize`` returns reduces, partitions and clips the gradient itself, so
the engine reaches it through the engine's public surface only:

- each backward is ``engine.backward(loss * weight, scale_wrt_gas=False)``: the window's
  weight, never DeepSpeed's division by ``gradient_accumulation_steps`` (the mean of means);
- the window decides the boundary (``set_gradient_accumulation_boundary``, or DeepSpeed's
  own step when the config says ``"managed_gradient_accumulation": false``), so windows of
  any length (a callable ``steps``, token budgets, a partial last window) close where they end;
- ZeRO-1 reduces once, at the boundary; ZeRO-2 reduces once per window inside
  ``coalesce_grad_reduction()`` (or per micro-batch with ``sync_every_micro_batch=True``,
  keeping its gradients partitioned); ZeRO-3 reduces per micro-batch by design;
- the boundary scale: without ZeRO the gradient is in ``.grad`` (the plain store scales it);
  under ZeRO it sits in the optimizer's fp32 partitions, which unscale by the loss scale at
  the step, so the scale is handed over as ``override_loss_scale(1 / scale)``. DeepSpeed's
  norm and clipping then see the window's true gradient.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from typing import Any, ContextManager, Iterator, Optional

import torch

from .grads import DenseStore, Stores
from .parallel import Collective, is_deepspeed_engine


class DeepSpeed(Collective):
    """A ``DeepSpeedEngine`` (ZeRO stage 0 to 3), chosen when the model is one."""

    can_encode = False  # re-encoding would run outside DeepSpeed's backward bookkeeping

    @staticmethod
    def wraps(model: Any) -> bool:
        return is_deepspeed_engine(model)

    def prepare(self, optimizer: Any, precision: str, accum_dtype: Any, compact: bool, scheduler: Any,
                max_grad_norm: Optional[float], sync_every_micro_batch: bool) -> tuple[Any, list[torch.Tensor], Any]:
        optimizer = check(self.engine, optimizer, precision, accum_dtype, compact, scheduler)
        self.configure(max_grad_norm, sync_every_micro_batch)
        # The module's own parameters: a ZeRO optimizer's groups hold its flat fp32 partitions;
        # and no clip norm for the accumulator: the engine clips the window's gradient in its step.
        return optimizer, [p for p in self.engine.parameters() if p.requires_grad], None

    def controls_sync(self, sync_every_micro_batch: bool) -> bool:
        return True  # the window owns DeepSpeed's accumulation boundary

    def __init__(self, engine: Any):
        super().__init__(engine)
        self.engine: Any = engine
        self._refuse_if_open("an Accumulator (or integration) built on it now")
        self.stage = int(engine.zero_optimization_stage())
        self.name = f"DeepSpeed ZeRO-{self.stage}"
        self.managed = bool(engine.managed_gradient_accumulation())
        # Under ZeRO the gradient lives in the optimizer's partitions, out of the stores' reach.
        self.owns_gradients = self.stage > 0
        self.coalesce = False
        self._window: Optional[contextlib.ExitStack] = None
        self._own_stores: Optional[Stores] = None
        if self.owns_gradients:
            self.holds_window_grads = (
                f"under {self.name} the partial window's gradients sit in DeepSpeed's partitions, out of "
                "reach. Save at a window boundary (after window.step()): engine.save_checkpoint(dir) "
                "and acc.state_dict()"
            )

    def configure(self, max_grad_norm: Optional[float], sync_every_micro_batch: bool, notice: bool = True) -> None:
        """Check the engine's config against the accumulator's and hand it the clip norm (the
        engine clips, so the accumulator's own step clips nothing: it returns None)."""
        engine = self.engine
        if self.stage == 2 and self.managed and not sync_every_micro_batch:
            self.coalesce = hasattr(engine.optimizer, "_coalesce_grad_reduction")
        configured = float(engine.gradient_clipping() or 0.0)
        written = "gradient_clipping" in getattr(engine._config, "_param_dict", {"gradient_clipping": None})
        if written and configured and max_grad_norm is not None and not math.isclose(configured, max_grad_norm):
            raise ValueError(
                f"max_grad_norm={max_grad_norm} and the DeepSpeed config's \"gradient_clipping\": {configured}: "
                "both would clip the window's gradient. Keep one (the config key, or max_grad_norm with "
                "\"gradient_clipping\": 0)"
            )
        gas = engine.gradient_accumulation_steps()
        if gas != 1 and notice:
            warnings.warn(
                f"the DeepSpeed config's \"gradient_accumulation_steps\": {gas} does not set the boundary "
                "here: each window closes where it ends and weighs its micro-batches by their items "
                "(DeepSpeed's division by it is not applied)", stacklevel=4)
        # One clip, DeepSpeed's, at its step: after the boundary scale (in .grad, or in the loss
        # scale under ZeRO), so it clips the window's gradient. max_grad_norm replaces the
        # config's value where the user wrote none (DeepSpeed's default is 1.0); these
        # attributes are the thresholds its step reads.
        clip = float(max_grad_norm) if max_grad_norm is not None else configured
        engine._config.gradient_clipping = clip
        if hasattr(engine.optimizer, "clip_grad"):
            engine.optimizer.clip_grad = clip
        return None

    @contextlib.contextmanager
    def _not_boundary(self) -> Iterator[None]:
        self.engine.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            # The next backward (the window's last, if nothing else opens this) is the boundary.
            self.engine.set_gradient_accumulation_boundary(True)

    def skip_sync(self) -> ContextManager[None]:
        return self._not_boundary() if self.managed else contextlib.nullcontext()

    def _refuse_if_open(self, what: str) -> None:
        """The engine's partial gradients belong to one window: another adapter's open window
        on the same engine would be absorbed into this one's update."""
        owner = getattr(self.engine, "_gradaccum_window", None)
        other = owner() if owner is not None else None
        if other is not None and other is not self:
            raise RuntimeError(
                f"this DeepSpeed engine holds another Accumulator's open window (its micro-batches' gradients are "
                f"inside the engine), and {what} would take them into its own update. Finish that window "
                "(window.step()) before, or drive one engine with one Accumulator")

    def begin_window(self) -> None:
        self._refuse_if_open("a window opening on another Accumulator")
        self.engine._gradaccum_window = weakref.ref(self)
        if self.managed:
            self.engine.set_gradient_accumulation_boundary(True)  # a window of one micro-batch
        if self.coalesce and self._window is None:
            self._window = contextlib.ExitStack()
            self._window.enter_context(self.engine.coalesce_grad_reduction())

    def _end_window(self) -> None:
        window, self._window = self._window, None
        if window is not None:
            window.close()  # ZeRO-2's one reduction of the window

    def backward(self, loss: torch.Tensor, weight: Any) -> None:
        # The weight is the whole scaling: DeepSpeed must not divide by its accumulation steps.
        self.engine.backward(loss * weight, scale_wrt_gas=False)

    def finalize(self, stores: Any, scale: Any) -> Optional[list[torch.Tensor]]:
        self._end_window()
        if not self.owns_gradients:
            return stores.finalize(scale)
        # ZeRO divides its partitions by the loss scale at the step: 1/scale multiplies them
        # by scale (one host read: the step reads its numbers anyway).
        self.engine.optimizer.override_loss_scale(1.0 / float(scale))
        return None

    def scale_window(self, scale: float) -> None:
        """For an integration that drives the engine itself (Accelerate, Lightning): the
        window's scale, before its ``engine.step()``. Without ZeRO the reduced gradient is in
        the module's ``.grad``, where a plain store scales it."""
        if self._own_stores is None:
            params = [p for p in self.engine.module.parameters() if p.requires_grad]
            self._own_stores = Stores([] if self.owns_gradients else [DenseStore(params, list(range(len(params))))])
        self.finalize(self._own_stores, scale)

    def _end_owner(self) -> None:
        owner = getattr(self.engine, "_gradaccum_window", None)
        if owner is not None and owner() is self:
            self.engine._gradaccum_window = None

    def update(self, optimizer: Any) -> Optional[tuple[float, bool]]:
        engine = self.engine
        self._end_owner()
        if self.managed:
            engine.set_gradient_accumulation_boundary(True)
        engine.step()
        applied = bool(engine.was_step_applied())
        if not self.owns_gradients:
            return None if applied else (float("nan"), False)
        self.reset_scale()
        norm = engine.get_global_grad_norm()
        return (float(norm) if norm is not None else float("nan")), applied

    def reset_scale(self) -> None:
        """After the step: the next window's backwards are unscaled again."""
        if self.owns_gradients:
            self.engine.optimizer.override_loss_scale(1.0)

    def abandon(self) -> None:
        self._end_owner()
        self._end_window()
        self.reset_scale()
        if self.owns_gradients:
            self.engine.optimizer.zero_grad(set_to_none=True)


def check(engine: Any, optimizer: Any, precision: str, accum_dtype: Any, compact: bool, scheduler: Any) -> Any:
    """Refuse what cannot hold under DeepSpeed, before any work; return the optimizer to use."""
    if type(engine).__name__ == "PipelineEngine" or getattr(engine, "pipeline_parallelism", False):
        raise ValueError(
            "a DeepSpeed PipelineEngine: its train_batch() runs the micro-batches itself, so an Accumulator "
            "cannot open windows around them. Build the PipelineModule with loss_fn=gradaccum.pipeline.ExactLoss"
            "(loss, count) and call engine.train_batch(exact.windows(batches, engine)): docs/model-parallel.md"
        )
    accepted = [engine.optimizer, getattr(engine.optimizer, "optimizer", None), getattr(engine, "client_optimizer", None)]
    if engine.optimizer is None or not any(optimizer is o for o in accepted if o is not None):
        raise TypeError(
            "under DeepSpeed, pass the optimizer that deepspeed.initialize returned (engine.optimizer), "
            f"or the one you gave it; got {type(optimizer).__name__}. deepspeed.initialize needs an "
            "optimizer (optimizer=..., or an \"optimizer\" section in its config)"
        )
    if engine.fp16_enabled():
        raise ValueError(
            "DeepSpeed's fp16 section: its dynamic loss scale is where the engine hands over the window's "
            "scale. Use its \"bf16\" section instead (exact, as under one process)"
        )
    if precision != "fp32":
        raise ValueError(
            f"precision={precision!r} with a DeepSpeed engine: DeepSpeed casts the model itself. Leave "
            "precision='fp32' and enable the config's \"bf16\" section"
        )
    if accum_dtype is not None:
        raise ValueError(
            "accum_dtype with a DeepSpeed engine: DeepSpeed holds the accumulated gradients; set the "
            "config's \"data_types\": {\"grad_accum_dtype\": \"fp32\"} instead"
        )
    if compact:
        raise ValueError(
            "compact_embedding_grads with a DeepSpeed engine: DeepSpeed's reduction hooks take the "
            "gradients as they arrive, so no rows can be held aside. Build the Accumulator without it"
        )
    if scheduler is not None and getattr(engine, "lr_scheduler", None) is not None:
        raise ValueError(
            "a scheduler both here and in deepspeed.initialize: the engine steps its own at each update, "
            "so it would step twice. Give it to one of them"
        )
    return engine.optimizer
