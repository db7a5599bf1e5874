"""``Accumulator`` and ``Window``: the public loop, thin; the parts do the work.

Parts, each chosen once at construction: a data-parallel adapter (``parallel``), gradient
stores (``grads``), the normalisation rule (``rules``), the window planner (``plan``) and the
step (``step``). The CLI and the distributed path go through here; integrations whose
framework runs the backward (Accelerate, Lightning) share the same arithmetic through
``gradaccum._weights.Tally`` and ``engine/termgrads.py``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import torch

from .. import _weights
from . import backward as _backward
from . import encoded as _encoded
from . import step as _step
from .build import build_parts
from .packet import rank_vector
from .parts import Parts, WindowState
from .plan import Lookahead, Planner
from .._state import StepReport


class Window(WindowState):
    """One optimizer step's worth of micro-batches; made by :meth:`Accumulator.windows`.

    Iterate it once for the micro-batches, call :meth:`backward` (or
    :meth:`forward_backward`) for each, then :meth:`step`. Under DDP/FSDP2 a rank that has
    run out of micro-batches repeats its last one at weight zero so that its collectives
    pair with the other ranks'; :attr:`is_stand_in` tells when the current one is such.

    Example:
        >>> for window in acc.windows(loader):  # doctest: +SKIP
        ...     for x, y in window:
        ...         with window.autocast():
        ...             loss = loss_fn(model(x), y)
        ...         window.backward(loss, num_items=len(y))
        ...     report = window.step()
    """

    @property
    def planned(self) -> int:
        """Micro-batches planned for this window (the last window may get fewer)."""
        return self._acc.state.planned

    def __iter__(self) -> Iterator[Any]:
        if self._iterated:
            raise RuntimeError(
                "this window was already iterated: a window yields its micro-batches once; iterating it "
                "again would take the next window's micro-batches. Use the next window from acc.windows()"
            )
        self._iterated = True
        return self._micro_batches()

    def _micro_batches(self) -> Iterator[Any]:
        acc, planner = self._acc, self._acc.planner
        final = self._count - 1
        bare = not acc.sync_control  # one process (or sync every micro-batch): nothing to enter
        for i in range(self._count):
            if self.closed or self.finished is not None:
                return
            acc.check_current(self)
            batch, self.is_stand_in = planner.next()
            self.rule.before_micro_batch(batch)
            self.yielded += 1
            self._last = last = i == final
            if bare or (last and not self.explicit_reduce):
                yield batch  # the last micro-batch's backward is the one that synchronises
            else:
                # Entered before the forward: DDP decides there whether the backward all-reduces.
                with acc.skip_sync():
                    yield batch

    def backward(self, loss: Union[torch.Tensor, Mapping[str, Any]], num_items: Any = None) -> None:
        """Backpropagate one micro-batch's mean ``loss`` with its weight in the window.

        Args:
            loss: scalar tensor, the mean over this micro-batch's items; or, for a loss with
                several denominators, a mapping ``{term: (mean, num_items)}`` (or ``{term:
                mean}``, counted by the term's counter): the Accumulator's ``terms``. A term
                absent from the mapping has no items in this micro-batch.
            num_items: tokens or samples that ``loss`` averages over (an int, or a one-element
                tensor, read only at the step). Give it for every micro-batch or for none.

        Example:
            >>> window.backward(out.loss, num_items=int((labels != -100).sum()))  # doctest: +SKIP
            >>> window.backward({"lm": (lm_mean, n_tokens), "cls": (cls_mean, n_rows)})  # doctest: +SKIP
        """
        self._per_micro_batch()
        _backward.micro_batch(self._acc, self, loss, num_items, self._acc.planner.stand_in)
        if not self._last:
            self._acc.stores.between()

    def forward_backward(self, batch: Any, loss_fn: Callable[[Any], Any]) -> None:
        """Run ``loss_fn(batch) -> (mean loss, num_items)`` (or the mapping of terms that
        :meth:`backward` takes) under :meth:`autocast` and its
        backward, surviving out-of-memory errors: what a failed attempt added is discarded,
        the batch is split in two along dim 0 and the halves are retried, and the window's
        update is still the big batch's. The working split is kept for later micro-batches.

        In one process and under DDP (whose gradients the engine then reduces itself at the
        step, so that no rank is left in a collective). Under FSDP2 an attempt cannot be
        undone: every rank stops with the same error (see ``docs/distributed.md``).

        Example:
            >>> def loss_fn(b):  # doctest: +SKIP
            ...     return model(**b).loss, int((b["labels"] != -100).sum())
            >>> window.forward_backward(batch, loss_fn)  # doctest: +SKIP
        """
        self._per_micro_batch()
        _backward.forward_backward(self._acc, self, batch, loss_fn)
        if not self._last:
            self._acc.stores.between()

    def _per_micro_batch(self) -> None:
        if self.mode == "encode":
            raise RuntimeError(
                "window.backward() in a window that used window.encode(): a window either caches "
                "representations (encode + backward_encoded) or backpropagates micro-batch losses, not both"
            )
        self.mode = "backward"

    def encode(self, fn: Callable[[Any], Any], batch: Any) -> Any:
        """``fn(batch)`` without a graph, as leaves that require grad; the RNG state is saved.

        For losses that couple the window's items (in-batch negatives, contrastive losses):
        compute the loss over every micro-batch's representations, then call
        :meth:`backward_encoded` once. ``fn`` returns a tensor or a tuple/list/dict of
        tensors and runs under :meth:`autocast`. A stand-in micro-batch returns zero rows.

        Example:
            >>> for window in acc.windows(loader):  # doctest: +SKIP
            ...     reps = [window.encode(embed, batch) for batch in window]
            ...     q = torch.cat([r[0] for r in reps]); d = torch.cat([r[1] for r in reps])
            ...     window.backward_encoded(info_nce(window.gather(q), window.gather(d)))
            ...     window.step()
        """
        return _encoded.encode(self._acc, self, fn, batch)

    def backward_encoded(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` (a scalar over the window's encoded representations) to
        them, then re-encode each micro-batch with its saved RNG state and backpropagate the
        representations' gradients into the model. Once per window, after every encode.

        The gradient handed to the optimizer is the gradient of ``loss`` itself, as if the
        window had been one big batch. Under DDP compute ``loss`` over :meth:`gather`'s
        output, the same on every rank.

        Example:
            >>> window.backward_encoded(info_nce(q, d))  # doctest: +SKIP
        """
        _encoded.backward_encoded(self._acc, self, loss)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's rows of ``x`` in rank order (differentiable); ``x`` itself in one process.

        Ranks may hold different numbers of rows. Every rank must then compute the same loss
        from the gathered tensors: the gradient of a rank's rows is its slice of that loss's
        gradient.

        Example:
            >>> all_q = window.gather(torch.cat(queries))  # doctest: +SKIP
        """
        return _encoded.gather(self._acc, self, x)

    def finish(self) -> StepReport:
        """Leave the window's mean gradient in ``.grad`` (rescaled, reduced, unscaled, clipped)
        and report it, without updating: for custom optimizers, EMA or logging before the
        update. Then call ``optimizer.step()`` unless ``report.skipped``, then :meth:`close`.

        Example:
            >>> report = window.finish()  # doctest: +SKIP
            >>> if not report.skipped:  # doctest: +SKIP
            ...     optimizer.step()
            >>> window.close()  # doctest: +SKIP
        """
        self._acc.check_current(self, finishing=True)
        if self._acc.parallel.owns_gradients:
            raise RuntimeError(
                f"window.finish() under {self._acc.parallel.name}: the engine holds the window's gradient in "
                "its partitions and applies it inside engine.step(), so there is no .grad to inspect "
                "before the update. Use window.step()"
            )
        return _step.finish(self._acc, self)

    def close(self) -> None:
        """After :meth:`finish` and your update: scaler, scheduler (if not skipped), zeroed
        gradients, counters. The window is then done."""
        if self.closed:
            raise RuntimeError("close() was already called for this window")
        if self.finished is None:
            raise RuntimeError("close() before finish(): call window.finish() first (or use window.step())")
        _step.close(self._acc, self)

    def step(self) -> StepReport:
        """Close the window: rescale, unscale, clip, update, step the scheduler, zero grads.

        Example:
            >>> report = window.step()  # doctest: +SKIP
        """
        self._acc.check_current(self, finishing=True)
        report = _step.finish(self._acc, self)
        if not report.skipped:
            report = _step.update(self._acc, self)
        self.close()
        return report


class Accumulator(Parts):
    """Exact gradient accumulation: each update equals the update of the one big batch.

    Args:
        model: the module being trained (may be DDP- or FSDP2-wrapped).
        optimizer: its optimizer; its parameters are the ones rescaled, clipped, stepped.
        steps: micro-batches per optimizer step, an int >= 1 or a callable
            ``optimizer_step -> int`` evaluated when each window opens, or a sampler that
            cuts the windows itself (:class:`gradaccum.data.TokenBudgetSampler`).
        scheduler: learning-rate scheduler, stepped once per update, never per micro-batch.
        max_grad_norm: clip the accumulated gradient to this total norm (after unscaling).
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (+ GradScaler): the dtype of
            :meth:`Window.autocast` and of ``forward_backward``'s forward.
        accum_dtype: sum gradients of lower-precision parameters in this dtype (e.g.
            ``torch.float32`` for a bf16 model), cast once at the step.
        sync_every_micro_batch: reduce gradients across ranks after every micro-batch
            instead of once per window (FSDP2 models too large to hold a full unsharded
            gradient between micro-batches: less memory, k times the traffic).
        compact_embedding_grads: between micro-batches, hold ``nn.Embedding`` weights'
            gradients as the rows their lookups touched, so they are not in memory during
            the next forward. Exact to the bit.
        device_counts: keep counts and loss sums on the device, read once per step with the
            norm (default: on for accelerators, off on the CPU, where reading costs nothing).
        terms: for a loss with several denominators, each term's name and its counter, a
            function ``micro_batch -> items that term averages over``. The window's micro-batches
            are counted before its first backward, and :meth:`Window.backward` then takes
            ``{name: (mean, num_items)}`` (see ``docs/terms.md``); names alone keep one gradient
            store per term, and a ``gradaccum.moe.RouterLoss`` makes a router loss exact.
        data_parallel: the ranks that see different micro-batches, a process group or a
            ``DeviceMesh`` (several dimensions are flattened: ``mesh[("dp", "cp")]``). Counts are
            summed over these ranks only; tensor-parallel ranks, which see the same tokens, are
            not counted twice. Default: the model's own group (DDP's, FSDP2's), or every rank;
            required when the parameters lie on a mesh of several dimensions
            (``docs/model-parallel.md``).

    Example:
        >>> acc = Accumulator(model, optimizer, steps=4)  # doctest: +SKIP
        >>> for window in acc.windows(loader):  # doctest: +SKIP
        ...     for batch in window:
        ...         with window.autocast():
        ...             out = model(**batch)
        ...         window.backward(out.loss, num_items=count_items(batch))
        ...     report = window.step()
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: _weights.StepsLike = 1, *,
                 scheduler: Any = None, max_grad_norm: Optional[float] = None, precision: str = "fp32",
                 accum_dtype: Optional[torch.dtype] = None, sync_every_micro_batch: bool = False,
                 compact_embedding_grads: bool = False, device_counts: Optional[bool] = None,
                 terms: Any = None, data_parallel: Any = None):
        build_parts(self, model, optimizer, steps, scheduler, max_grad_norm, precision, accum_dtype,
                    sync_every_micro_batch, compact_embedding_grads, device_counts, terms, data_parallel)
        self._current: Optional[Window] = None
        self._generator: Optional[object] = None
        self._plan: Optional[list[int]] = None
        self._pass_window = 0
        self.autocast_used = False
        self.warned_autocast = False

    # -- the loop ---------------------------------------------------------------------

    def windows(self, loader: Iterable[Any]) -> Iterator[Window]:
        """Group ``loader``'s micro-batches into windows, one per optimizer step.

        The last window may be partial; it is still a mean over what it holds. A window
        left open by :meth:`load_state_dict` is completed first (and yielded even when
        ``loader`` has nothing left, so that its step is not lost).

        Example:
            >>> for window in acc.windows(loader):  # doctest: +SKIP
            ...     ...
        """
        if self._generator is not None:
            raise RuntimeError(
                "another acc.windows() loop is still running: finish it (or break out of it) before "
                "starting a new one; interleaving two would merge their micro-batches into one step"
            )
        token = object()
        self._generator = token
        self.stores.activate(True)
        try:
            yield from self._windows(loader)
        finally:
            if self._generator is token:
                self._generator, self._current = None, None
                self.stores.activate(False)

    def _windows(self, loader: Iterable[Any]) -> Iterator[Window]:
        st = self.state
        self.planner = Planner(Lookahead(loader), self.planner.stand_in)
        # A sampler that cuts windows itself (token budget) says how many micro-batches each has.
        self._plan = list(self.steps.window_plan()) if hasattr(self.steps, "window_plan") else None
        self._pass_window = 0
        pending = st.micro_batches > 0
        k = st.planned - st.micro_batches if pending else self.planned_ahead(0)
        if pending and self._plan is not None:
            if k == 0:
                self._pass_window = -1  # the loaded window is complete: the plan starts at the next one
            elif not self._plan or self._plan[0] != k:
                raise ValueError(
                    f"the loaded window has {k} micro-batch(es) to go but the sampler's plan starts with "
                    f"{self._plan[:1]}: resume the sampler where the checkpoint was taken "
                    "(sampler.set_epoch(epoch, start=micro-batches consumed in that epoch))"
                )
        self._count_window(k, open_totals=not pending)  # a loaded window keeps the totals it was saved with
        while self.planner.target > 0 or pending:
            if st.planned == 0:
                # Planned micro-batches set the provisional weights: the same number on every rank.
                st.planned = self.planner.target if self._plan is not None else self.planned_ahead(0)
            self.planner.open()
            self.parallel.begin_window()
            self.rule.open_window(self, self.planner.held(), self.planner.target)
            window = self._current = Window(self, self.planner.target)
            pending = False
            yield window
            if not window.closed:
                raise RuntimeError(
                    "window.step() was not called before the next window: call it once after "
                    "the window's micro-batches, or its gradients would leak into the next update"
                )
            self._pass_window += 1
            failed = window.read.get("ahead_failed", [0.0])[0] if window.read else 0.0
            if failed or self.ahead_error is not None:
                self.raise_ahead_error(failed)  # the window it belongs to cannot open
            if not self.reads_ahead:  # one process: the next window is drawn now, after the update
                self._count_window(self.planned_ahead(0), open_totals=True)

    def _count_window(self, k: int, open_totals: bool) -> None:
        """Plan the window about to open: every rank's micro-batches (up to ``k``), agreed, and
        what the rule counts of them ahead (one small all-reduce across ranks)."""
        local = self.window_counts(k)
        counts = self.parallel.all_sum(rank_vector(self.parallel.world, self.parallel.rank, local[0]) + local[1:])
        counts = counts if isinstance(counts, list) else counts.tolist()
        world = self.parallel.world
        if counts[-1] or self.ahead_error is not None:
            self.raise_ahead_error(counts[-1])
        self.planner.target = self.agree(counts[:world])
        if open_totals:
            self.rule.open(counts[world:-1])

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The accumulator's state (:class:`AccumulatorState`, as a dict), partial window included.

        Example:
            >>> torch.save(acc.state_dict(), "acc.pt")  # doctest: +SKIP
        """
        from .checkpoint import snapshot

        return snapshot(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; an open window continues in the next :meth:`windows`.

        The whole state is validated first: a refused one raises ``TypeError``/``ValueError``
        and changes nothing.

        Example:
            >>> acc.load_state_dict(torch.load("acc.pt"))  # doctest: +SKIP
        """
        from .checkpoint import restore

        restore(self, state_dict)
