"""The accumulation engine: the only loop that turns micro-batches into optimizer steps.

The CLI, the distributed path and the integrations all go through :class:`Accumulator`.
The arithmetic lives in ``_weights``; cross-rank control lives in ``_sync``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from torch.nn.modules.batchnorm import _BatchNorm

from . import _split, _sync, _weights
from ._state import AccumulatorState, StepReport
from ._compact import CompactRows, embedding_weights
from .nn import WindowBatchNorm

_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _total_norm(grads: list[torch.Tensor], uniform: bool, foreach: Optional[bool]) -> torch.Tensor:
    """Total 2-norm; one fused call when all gradients share a device and dtype (``uniform``,
    known from the parameters once), skipping the regrouping ``get_total_norm`` does in Python."""
    if not grads:
        return torch.zeros(())
    if uniform:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = torch.nn.utils.get_total_norm(grads, foreach=foreach)
    # FSDP2's sharded gradients give a DTensor norm: the full value needs the shards' sum.
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


class _Lookahead:
    """An iterator that can tell how many items follow (up to a limit), by fetching them early."""

    def __init__(self, iterable: Iterable[Any]):
        self._it = iter(iterable)
        self._ahead: collections.deque = collections.deque()
        self._exhausted = False

    def _fetch(self) -> bool:
        try:
            self._ahead.append(next(self._it))
        except StopIteration:
            self._exhausted = True
            return False
        return True

    def count(self, limit: int) -> int:
        while len(self._ahead) < limit and not self._exhausted and self._fetch():
            pass
        return min(len(self._ahead), limit)

    def has_next(self) -> bool:  # runs twice per micro-batch: no loop
        return bool(self._ahead) or (not self._exhausted and self._fetch())

    def pop(self) -> Any:
        return self._ahead.popleft()


class Window:
    """One optimizer step's worth of micro-batches; made by :meth:`Accumulator.windows`.

    Iterate it for the micro-batches, call :meth:`backward` for each, then :meth:`step`.

    Example:
        >>> for window in acc.windows(loader):  # doctest: +SKIP
        ...     for x, y in window:
        ...         window.backward(loss_fn(model(x), y), num_items=len(y))
        ...     report = window.step()
    """

    def __init__(self, accumulator: "Accumulator", batches: _Lookahead):
        self._acc = accumulator
        self._batches = batches
        self._remaining = accumulator.state.planned - accumulator.state.micro_batches
        self._last = False
        self._pad = False  # this micro-batch stands in for one this rank does not have
        self._pads = 0
        self.closed = False

    @property
    def planned(self) -> int:
        """Micro-batches planned for this window (the last window may get fewer)."""
        return self._acc.state.planned

    def __iter__(self) -> Iterator[Any]:
        acc = self._acc
        if acc._world > 1:
            yield from self._iter_ranks()
            return
        batches, final = self._batches, self._remaining - 1
        bare = acc._autocast is None and not acc._sync_control
        for i in range(self._remaining):
            if self.closed or not batches.has_next():
                return
            batch = batches.pop()
            # The last micro-batch is the one whose backward may synchronise across ranks;
            # in a partial window only a look at the next batch tells which one that is.
            last = i == final or not batches.has_next()
            self._last = last
            if bare or (last and acc._autocast is None):
                yield batch  # nothing to enter: keep the plain path free of context overhead
                continue
            with acc._micro_batch_context(last):
                yield batch

    def _iter_ranks(self) -> Iterator[Any]:
        # Every rank runs the window's largest micro-batch count, agreed at the last step:
        # a rank that has run out stands in with its last micro-batch at weight zero, so its
        # collectives (DDP's all-reduce, FSDP2's gathers) pair with the others' and the
        # update stays the big batch's.
        acc = self._acc
        target = acc._target
        for i in range(target):
            if self.closed:
                return
            if self._batches.has_next():
                batch, self._pad = self._batches.pop(), False
                acc._stand_in = batch
            else:
                batch, self._pad = acc._stand_in, True
            self._last = i == target - 1
            with acc._micro_batch_context(self._last):
                yield batch

    def backward(self, loss: torch.Tensor, num_items: Any = None) -> None:
        """Backpropagate one micro-batch's mean ``loss`` with its weight in the window.

        Args:
            loss: scalar tensor, the mean over this micro-batch's items.
            num_items: tokens or samples that ``loss`` averages over. Give it for every
                micro-batch of a window or for none.

        Example:
            >>> window.backward(out.loss, num_items=int((labels != -100).sum()))  # doctest: +SKIP
        """
        self._acc._backward(self, loss, num_items)
        if self._acc._compact is not None and not self._last:
            self._acc._compact.compact()

    def forward_backward(self, batch: Any, loss_fn: Callable[[Any], tuple[torch.Tensor, Any]]) -> None:
        """Run ``loss_fn(batch) -> (mean loss, num_items)`` and its backward, surviving
        out-of-memory errors: what a failed attempt added is discarded, the batch is split
        in two along dim 0 and the halves are retried, and the window's update is still the
        big batch's. The working split is kept for later micro-batches.

        Example:
            >>> def loss_fn(b):  # doctest: +SKIP
            ...     return model(**b).loss, int((b["labels"] != -100).sum())
            >>> window.forward_backward(batch, loss_fn)  # doctest: +SKIP
        """
        self._acc._forward_backward(self, batch, loss_fn)
        if self._acc._compact is not None and not self._last:
            self._acc._compact.compact()

    def step(self) -> StepReport:
        """Close the window: rescale, unscale, clip, update, step the scheduler, zero grads.

        Example:
            >>> report = window.step()  # doctest: +SKIP
        """
        return self._acc._step(self)


class Accumulator:
    """Exact gradient accumulation: each update equals the update of the one big batch.

    Args:
        model: the module being trained (may be DDP- or FSDP2-wrapped).
        optimizer: its optimizer; its parameters are the ones rescaled, clipped, stepped.
        steps: micro-batches per optimizer step, an int >= 1 or a callable
            ``optimizer_step -> int`` evaluated when each window opens.
        scheduler: learning-rate scheduler, stepped once per update, never per micro-batch.
        max_grad_norm: clip the accumulated gradient to this total norm (after unscaling).
        precision: ``"fp32"``, ``"bf16"`` (autocast) or ``"fp16"`` (autocast + GradScaler).
        accum_dtype: sum gradients of lower-precision parameters in this dtype (e.g.
            ``torch.float32`` for a bf16 model), cast once at the step.
        sync_every_micro_batch: reduce gradients across ranks after every micro-batch
            instead of once per window. For FSDP2 models too large to hold a full
            unsharded gradient between micro-batches: less memory, k times the traffic.
        compact_embedding_grads: between micro-batches, hold the gradients of
            ``nn.Embedding`` weights as their touched rows instead of dense matrices, so
            they are not in memory during the next forward (one process only; their
            ``.grad`` reads None until the window's last micro-batch). Exact to the bit.

    Example:
        >>> acc = Accumulator(model, optimizer, steps=4)  # doctest: +SKIP
        >>> for window in acc.windows(loader):  # doctest: +SKIP
        ...     for batch in window:
        ...         out = model(**batch)
        ...         window.backward(out.loss, num_items=count_items(batch))
        ...     report = window.step()
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        steps: _weights.StepsLike = 1,
        *,
        scheduler: Any = None,
        max_grad_norm: Optional[float] = None,
        precision: str = "fp32",
        accum_dtype: Optional[torch.dtype] = None,
        sync_every_micro_batch: bool = False,
        compact_embedding_grads: bool = False,
    ):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        self.steps = _weights.check_steps(steps)
        if scheduler is not None and not callable(getattr(scheduler, "step", None)):
            raise TypeError("scheduler must have a step() method (a torch LR scheduler) or be None")
        if max_grad_norm is not None and (
            isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float))
            or not math.isfinite(max_grad_norm) or max_grad_norm <= 0
        ):
            raise ValueError(f"max_grad_norm must be a positive number or None; got {max_grad_norm!r}")
        if precision not in _AUTOCAST:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST)}; got {precision!r}")
        if accum_dtype is not None and not (isinstance(accum_dtype, torch.dtype) and accum_dtype.is_floating_point):
            raise ValueError(f"accum_dtype must be a floating torch.dtype such as torch.float32 or None; got {accum_dtype!r}")

        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.max_grad_norm, self.precision, self.accum_dtype = max_grad_norm, precision, accum_dtype
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        first = next(iter(model.parameters()), None)
        self._device = first.device if first is not None else torch.device("cpu")
        self._world = _sync.data_parallel_world_size(model)
        # The fused per-list kernels also run on the CPU, where torch's default loops in Python.
        self._foreach = all(p.device.type in ("cpu", "cuda") for p in self._params) or None
        # Gradients share their parameters' device and dtype: check once, not every step.
        kinds = {(type(p) in (torch.nn.Parameter, torch.Tensor), p.device, p.dtype) for p in self._params}
        self._uniform = bool(self._foreach) and len(kinds) == 1 and next(iter(kinds))[0]
        self._cpu = self._device.type == "cpu"
        self._sync_control = not sync_every_micro_batch and (
            hasattr(model, "no_sync") or hasattr(model, "set_requires_gradient_sync")
        )
        self._autocast = _AUTOCAST[precision]
        self.scaler = torch.amp.GradScaler(self._device.type) if precision == "fp16" else None
        self._low = [
            i for i, p in enumerate(self._params)
            if accum_dtype is not None and p.is_floating_point()
            and torch.finfo(p.dtype).bits < torch.finfo(accum_dtype).bits
        ]
        if self._low and self._world > 1:
            raise NotImplementedError(
                "accum_dtype with a DDP/FSDP model is not supported: DDP would reduce only the "
                "last micro-batch. Use FSDP2's MixedPrecisionPolicy(reduce_dtype=...) instead."
            )
        self._compact: Optional[CompactRows] = None
        if compact_embedding_grads:
            if self._world > 1:
                raise NotImplementedError(
                    "compact_embedding_grads is for one process: DDP/FSDP reduce .grad in the last "
                    "backward, before held rows could join it"
                )
            mine = {id(p) for i, p in enumerate(self._params) if i not in self._low}
            self._compact = CompactRows(p for p in embedding_weights(model) if id(p) in mine)
        self._window_norms = [m for m in model.modules() if isinstance(m, WindowBatchNorm)]
        plain_bn = [n for n, m in model.named_modules() if isinstance(m, _BatchNorm) and not isinstance(m, WindowBatchNorm)]
        if plain_bn:
            warnings.warn(
                f"BatchNorm layers ({', '.join(plain_bn[:4])}{' ...' if len(plain_bn) > 4 else ''}) use "
                "micro-batch statistics, so accumulation cannot match the big batch for them; "
                "see gradaccum.nn.convert_batchnorm(model, to='window' or 'groupnorm')",
                stacklevel=2,
            )
        self._buffers: dict[int, torch.Tensor] = {}
        self._losses: list[tuple[torch.Tensor, float]] = []
        self._parts = 1  # forward_backward's remembered split of a micro-batch
        self._last_seed: Optional[torch.Tensor] = None
        self._last_weight = 0.0
        self._target = 0  # across ranks: micro-batches in the open window, the same on every rank
        self._stand_in: Any = None  # across ranks: the last micro-batch, for zero-weight stand-ins
        self.state = AccumulatorState()

    # -- the loop ---------------------------------------------------------------------

    def windows(self, loader: Iterable[Any]) -> Iterator[Window]:
        """Group ``loader``'s micro-batches into windows, one per optimizer step.

        The last window may be partial; it is still a mean over what it holds. A window
        left open by :meth:`load_state_dict` is completed first.

        Example:
            >>> for window in acc.windows(loader):  # doctest: +SKIP
            ...     ...
        """
        batches = _Lookahead(loader)
        if self._world > 1:
            self._target = self._agree_on_counts(
                _sync.global_sums(_sync.rank_vector(self._world, self._count_ahead(
                    batches, (self.state.planned or _weights.resolve_steps(self.steps, self.state.optimizer_step))
                    - self.state.micro_batches)), self._device, self._world)
            )
        while batches.has_next() if self._world == 1 else self._target > 0:
            if self.state.planned == 0:
                self.state.planned = _weights.resolve_steps(self.steps, self.state.optimizer_step)
            window = Window(self, batches)
            yield window
            if not window.closed:
                raise RuntimeError(
                    "window.step() was not called before the next window: call it once after "
                    "the window's micro-batches, or its gradients would leak into the next update"
                )

    def _count_ahead(self, batches: _Lookahead, k: int) -> float:
        """Micro-batches (up to k) this rank has for the next window; -1 if it has none and
        no earlier micro-batch to stand in with."""
        n = batches.count(k)
        return float(n) if n or self._stand_in is not None else -1.0

    def _agree_on_counts(self, counts: list[float]) -> int:
        """The next window's micro-batch count on every rank: the largest any rank has."""
        target = int(max(counts))
        missing = [r for r, c in enumerate(counts) if c < 0]
        if target > 0 and missing:
            raise RuntimeError(
                f"uneven data across ranks: ranks {missing} have no micro-batch at all while others "
                "have data; give every rank data (DistributedSampler pads so that each gets as many)"
            )
        short = [r for r, c in enumerate(counts) if c < target]
        if target > 0 and short:
            warnings.warn(
                f"ranks {short} have fewer micro-batches than others in this window; they stand in "
                "with zero-weight micro-batches, so the update is still the big batch's",
                stacklevel=3,
            )
        return target

    def _micro_batch_context(self, last: bool) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if not last:
            # Entered before the forward: DDP decides there whether the backward all-reduces.
            stack.enter_context(_sync.skip_gradient_sync(self.model))
        if self._autocast is not None:
            stack.enter_context(torch.autocast(self._device.type, dtype=self._autocast))
        return stack

    def _backward(self, window: Window, loss: torch.Tensor, num_items: Any) -> None:
        if window.closed:
            raise RuntimeError("backward() after step(): this window is closed; use the next window")
        if window._pad:
            self._stand_in_backward(window, loss)
            return
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(
                f"loss must be a scalar tensor (the mean over the micro-batch's items); got {shape}. "
                "Reduce it with .mean() or .sum() / num_items first."
            )
        if not loss.requires_grad:
            raise ValueError("loss does not require grad: compute it from the model's output, outside torch.no_grad()")
        st = self.state
        n, weighted = _weights.micro_batch_items(num_items, st.weighted)
        if st.micro_batches == 0 and self._world == 1:
            # One process: the window's first micro-batch sets the scale, so a window of one
            # micro-batch is exactly the plain step and equal full windows need no rescaling.
            st.reference = n
        elif st.reference is None:
            # Across ranks the weights must share one reference: the mean of the ranks' first
            # micro-batches, once; later windows reuse the last window's global mean.
            st.reference = _sync.global_sums([n], self._device, self._world)[0] / self._world
        weight = _weights.provisional_weight(n, st.reference, st.planned)
        # The loss is a mean over n items; weight n/D makes the held gradient a sum over items
        # (the mean of means is not the mean), and the boundary scale D/N makes it a mean.
        if loss.dim():
            loss = loss.reshape(())
        if self.scaler is not None:
            self.scaler.scale(loss * weight).backward()
        elif type(loss) is not torch.Tensor:  # a tensor subclass (DTensor) wants its own kind of seed
            (loss * weight).backward()
        else:
            # Seeding backward with the weight is d(loss * weight)/d(loss) without a multiply
            # node in the graph or the ones_like that a bare backward() makes.
            loss.backward(self._seed(weight, loss))
        if self._low:
            self._move_to_buffers()
        st.weighted = weighted
        st.micro_batches += 1
        st.items += n
        if self._cpu:
            st.loss_sum += loss.item() * n  # no device to wait for: no tensors to keep
        else:
            self._losses.append((loss.detach(), n))  # read at the step: one device sync per window

    def _seed(self, weight: float, loss: torch.Tensor) -> torch.Tensor:
        """The weight as a tensor like ``loss``; kept while it repeats (equal micro-batches)."""
        seed = self._last_seed
        if seed is None or self._last_weight != weight or seed.dtype != loss.dtype or seed.device != loss.device:
            seed = self._last_seed = torch.full((), weight, dtype=loss.dtype, device=loss.device)
            self._last_weight = weight
        return seed

    def _forward_backward(self, window: Window, batch: Any, loss_fn: Callable[[Any], tuple[torch.Tensor, Any]]) -> None:
        done_before = self.state.micro_batches
        pieces = [batch]
        parts = min(self._parts, _split.batch_size(batch) or 1)
        if parts > 1:
            pieces = _split.split_batch(batch, parts)
        while pieces:
            piece = pieces.pop(0)
            # Only the final piece of a window's last micro-batch may synchronise across ranks.
            sync = window._last and not pieces
            try:
                self._piece_backward(window, piece, loss_fn, sync)
            except torch.OutOfMemoryError as exc:
                n = _split.batch_size(piece)
                if n is None or n <= 1:
                    raise torch.OutOfMemoryError(
                        f"out of memory on a micro-batch of {n} item(s), which cannot be split further: "
                        "the model alone does not fit; free memory or shard the model"
                    ) from exc
                pieces[:0] = _split.split_batch(piece, 2)
                self.state.splits += 1
                self._parts = max(self._parts, -(-(_split.batch_size(batch) or 1) // ((n + 1) // 2)))
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()
        self.state.micro_batches = done_before + 1  # the pieces are one micro-batch of the window

    def _piece_backward(self, window: Window, piece: Any, loss_fn: Callable, sync: bool) -> None:
        if sync and self._world > 1:
            # The synchronising backward writes reduced gradients over what was held: it cannot
            # be undone, so it runs once, without a snapshot.
            loss, n = loss_fn(piece)
            self._backward(window, loss, n)
            return
        # Hold the gradients so far aside: the attempt writes fresh ones, which are kept only
        # if it finishes (an OOM in backward may have written some parameters already).
        held = [p.grad for p in self._params]
        for p in self._params:
            p.grad = None
        try:
            context = _sync.skip_gradient_sync(self.model) if self._world > 1 else contextlib.nullcontext()
            with context:
                loss, n = loss_fn(piece)
                self._backward(window, loss, n)
        except BaseException:
            for p, g in zip(self._params, held):
                p.grad = g
            raise
        for p, g in zip(self._params, held):
            if g is not None:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g

    def _stand_in_backward(self, window: Window, loss: torch.Tensor) -> None:
        st = self.state
        if st.reference is None:  # the other ranks make this all-reduce in their first backward
            st.reference = _sync.global_sums([0.0], self._device, self._world)[0] / self._world
        (loss.reshape(()) * 0.0).backward()  # runs the collectives; adds nothing
        if self._low:
            self._move_to_buffers()
        window._pads += 1

    def _move_to_buffers(self) -> None:
        # Summing many bf16 gradients in bf16 loses low bits at every add; the buffer keeps
        # them, and the single cast at the step rounds once.
        for i in self._low:
            p = self._params[i]
            if p.grad is None:
                continue
            buf = self._buffers.get(i)
            if buf is None:
                self._buffers[i] = p.grad.to(self.accum_dtype)
            else:
                buf.add_(p.grad)
            p.grad = None

    def _step(self, window: Window) -> StepReport:
        if window.closed:
            raise RuntimeError("step() was already called for this window; iterate the next window")
        st = self.state
        if st.micro_batches == 0 and not window._pads:
            raise RuntimeError("step() on a window with no backward(): call window.backward(loss) for its micro-batches first")
        if self._compact is not None:
            self._compact.restore()
        values = [st.items, self._loss_sum(), st.micro_batches]
        if self._world > 1:  # each rank's micro-batches for the next window ride along
            values += _sync.rank_vector(
                self._world, self._count_ahead(window._batches, _weights.resolve_steps(self.steps, st.optimizer_step + 1))
            )
        sums = _sync.global_sums(values, self._device, self._world)
        items, loss_sum, micro_batches = sums[:3]
        scale = _weights.boundary_scale(items, st.reference, st.planned, self._world)
        grads = self._finish_grads(scale)
        if self.scaler is not None:
            # Unscale before measuring or clipping: the clip threshold is for true gradients.
            self.scaler.unscale_(self.optimizer)
        norm_t = _total_norm(grads, self._uniform, self._foreach)
        norm = float(norm_t)
        skipped = not math.isfinite(norm)
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer.param_groups else None
        if not skipped:
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self._params, self.max_grad_norm, norm_t, foreach=self._foreach)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
        if self.scaler is not None:
            self.scaler.update()  # backs the scale off after an overflow
        self.optimizer.zero_grad(set_to_none=True)
        for norm in self._window_norms:  # their running statistics move once per window
            norm.close_window()
        st.optimizer_step += 1
        # Across ranks the next window reuses this window's global items per micro-batch: the
        # same number on every rank, and a boundary scale of 1 for a window like this one.
        st.reference = items / micro_batches if self._world > 1 else None
        weighted, splits = st.weighted, st.splits
        st.close_window()
        self._losses = []
        window.closed = True
        if self._world > 1:
            self._target = self._agree_on_counts(sums[3:])
        return StepReport(
            step=st.optimizer_step,
            loss=loss_sum / items,
            num_items=items if weighted is not False else None,
            micro_batches=int(micro_batches),
            grad_norm=norm,
            skipped=skipped,
            lr=float(lr) if lr is not None else None,
            splits=splits,
        )

    def _loss_sum(self) -> float:
        """Sum of loss * items over the open window, read once (one device sync)."""
        total = float(self.state.loss_sum)
        if self._losses:  # one device synchronisation, not one per micro-batch
            values = torch.stack([loss for loss, _ in self._losses]).tolist()
            total += sum(v * n for v, (_, n) in zip(values, self._losses))
        return total

    def _finish_grads(self, scale: float) -> list[torch.Tensor]:
        grads = [p.grad for p in self._params if p.grad is not None]
        if scale != 1.0 and grads:
            torch._foreach_mul_(grads, scale)
        if self._buffers:
            for i, buf in self._buffers.items():
                p = self._params[i]
                p.grad = buf.mul_(scale).to(p.dtype)
            self._buffers = {}
            grads = [p.grad for p in self._params if p.grad is not None]
        return grads

    # -- checkpointing ----------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The accumulator's state, the partial window's gradients included.

        Example:
            >>> torch.save(acc.state_dict(), "acc.pt")  # doctest: +SKIP
        """
        if self._compact is not None:
            self._compact.restore()  # the saved gradients are dense
        state = dataclasses.asdict(self.state)
        state["loss_sum"] = self._loss_sum()
        out: dict[str, Any] = {"state": state, "grads": {}}
        if self.state.micro_batches:
            for i, p in enumerate(self._params):
                held = self._buffers.get(i, p.grad)
                if held is not None:
                    out["grads"][i] = held.detach().clone()
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; an open window continues in the next :meth:`windows`.

        Example:
            >>> acc.load_state_dict(torch.load("acc.pt"))  # doctest: +SKIP
        """
        fields = {f.name for f in dataclasses.fields(AccumulatorState)}
        unknown = set(state_dict.get("state", {})) - fields
        if "state" not in state_dict or unknown:
            raise ValueError(f"not an Accumulator state_dict (unknown fields: {sorted(unknown)})")
        grads = state_dict.get("grads", {})
        if any(int(i) >= len(self._params) for i in grads):
            raise ValueError("the saved gradients do not match this optimizer's parameters")
        self.state = AccumulatorState(**state_dict["state"])
        self._buffers, self._losses = {}, []
        if self._compact is not None:
            self._compact.clear()
        for p in self._params:
            p.grad = None
        for i, g in grads.items():
            i = int(i)
            p = self._params[i]
            if i in self._low:
                self._buffers[i] = g.to(device=p.device, dtype=self.accum_dtype).clone()
            else:
                p.grad = g.to(device=p.device, dtype=p.dtype).clone()
        if self.scaler is not None and "scaler" in state_dict:
            self.scaler.load_state_dict(state_dict["scaler"])
