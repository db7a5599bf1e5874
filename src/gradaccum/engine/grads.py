"""Gradient stores: where a window's accumulated gradient lives between micro-batches.

Every store owns some of the optimizer's parameters and answers the same calls:

- ``absorb()`` after each successful backward, ``between()`` after each non-last
  micro-batch: move what autograd left in ``.grad`` to where the store keeps it;
- ``take()`` / ``put_back()`` / ``merge()``: set the held ``.grad`` aside before a retried
  attempt, restore it if the attempt fails, add it to the attempt's if it succeeds;
- ``reducible()``: the tensors that hold the window's sum (what a data-parallel adapter
  reduces), ``finalize(scale)``: the mean, in ``.grad``, ready for the optimizer;
- ``held()`` / ``load()``: the partial window's gradients for a checkpoint.

A parameter's accumulated gradient is always ``.grad`` (zero when None) plus what its store
holds; every step below keeps that true one statement at a time, so that an error half-way
(an out-of-memory error, say) loses nothing.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

Scale = Union[float, torch.Tensor]


class DenseStore:
    """Gradients accumulate in ``.grad``, as autograd leaves them (the plain loop's way)."""

    active = False  # whether a windows() loop runs (the compact store records lookups then)

    def __init__(self, params: list[torch.Tensor], index: list[int]):
        self.params, self.index = params, index

    def absorb(self) -> None:
        pass

    def between(self) -> None:
        pass

    def take(self) -> list[Optional[torch.Tensor]]:
        held = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        return held

    def put_back(self, held: list[Optional[torch.Tensor]]) -> None:
        for p, g in zip(self.params, held):
            p.grad = g

    def merge(self, held: list[Optional[torch.Tensor]]) -> None:
        for p, g in zip(self.params, held):
            if g is not None:
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g

    def any_grad(self) -> bool:
        return any(p.grad is not None for p in self.params)

    def reducible(self) -> list[torch.Tensor]:
        return [p.grad for p in self.params if p.grad is not None]

    def finalize(self, scale: Scale) -> list[torch.Tensor]:
        grads = self.reducible()
        if grads and not (isinstance(scale, float) and scale == 1.0):
            torch._foreach_mul_(grads, scale)
        return grads

    def materialize(self) -> None:
        """Zeros where no gradient arrived, so that every rank reduces the same tensors."""
        for p in self.params:
            if p.grad is None and p.requires_grad:
                p.grad = torch.zeros_like(p)

    def held(self) -> dict[int, torch.Tensor]:
        return {i: p.grad.detach().clone() for i, p in zip(self.index, self.params) if p.grad is not None}

    def load(self, grads: dict[int, torch.Tensor]) -> None:
        for i, p in zip(self.index, self.params):
            g = grads.get(i)
            p.grad = None if g is None else g.to(device=p.device, dtype=p.dtype).clone()

    def clear(self) -> None:
        for p in self.params:
            p.grad = None

    def deferred(self) -> list[torch.Tensor]:
        """Device-side checks to read with the step's one host sync."""
        return []

    def check(self, values: list[float]) -> None:
        pass


class BufferStore(DenseStore):
    """Low-precision parameters' gradients summed in a wider dtype (``accum_dtype``).

    Summing many bf16 gradients in bf16 loses low bits at every add; the buffer keeps them,
    and the single cast at the step rounds once.
    """

    def __init__(self, params: list[torch.Tensor], index: list[int], dtype: torch.dtype):
        super().__init__(params, index)
        self.dtype = dtype
        self.buffers: dict[int, torch.Tensor] = {}

    def absorb(self) -> None:
        for j, p in enumerate(self.params):
            if p.grad is None:
                continue
            buf = self.buffers.get(j)
            if buf is None:
                self.buffers[j] = p.grad.to(self.dtype)
            else:
                buf.add_(p.grad)
            p.grad = None

    def any_grad(self) -> bool:
        return bool(self.buffers) or super().any_grad()

    def reducible(self) -> list[torch.Tensor]:
        self.absorb()
        return list(self.buffers.values())

    def finalize(self, scale: Scale) -> list[torch.Tensor]:
        self.absorb()
        for j, buf in self.buffers.items():
            self.params[j].grad = buf.mul_(scale).to(self.params[j].dtype)
        self.buffers = {}
        return [p.grad for p in self.params if p.grad is not None]

    def materialize(self) -> None:
        for j, p in enumerate(self.params):
            if j not in self.buffers and p.requires_grad:
                self.buffers[j] = torch.zeros_like(p, dtype=self.dtype)

    def held(self) -> dict[int, torch.Tensor]:
        self.absorb()
        return {self.index[j]: buf.clone() for j, buf in self.buffers.items()}

    def load(self, grads: dict[int, torch.Tensor]) -> None:
        self.clear()
        for j, (i, p) in enumerate(zip(self.index, self.params)):
            if i in grads:
                self.buffers[j] = grads[i].to(device=p.device, dtype=self.dtype).clone()

    def clear(self) -> None:
        super().clear()
        self.buffers = {}


class CompactStore(DenseStore):
    """Embedding gradients held as the rows the micro-batches looked up, between micro-batches.

    A micro-batch touches few rows of a word-embedding matrix (MiniLM: at most 2,048 of
    30,522 for 16 x 128 tokens), yet its gradient is dense, and accumulation holds it through
    the next forward, where activations peak. The rows come from the ids each
    ``nn.Embedding`` looked up (a forward hook), so finding them needs no look at the
    gradient's values and, with ``sync_free``, no host sync: duplicates are kept as zero rows
    instead of being removed (a data-dependent size). It is exact: each element is still
    the sum of the same micro-batch gradients in the same order. A gradient outside those
    rows (a weight also used elsewhere) is caught: in one process it falls back to dense;
    with ``sync_free`` the step raises, because dropping it would be silently wrong.
    """

    def __init__(self, params: list[torch.Tensor], index: list[int], modules: list[torch.nn.Embedding],
                 sync_free: bool):
        super().__init__(params, index)
        self.sync_free = sync_free
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ids: dict[int, list[torch.Tensor]] = {j: [] for j in range(len(params))}
        self.dense: set[int] = set()  # parameters found used outside their lookups
        self.stray: Optional[torch.Tensor] = None
        # Record only while this accumulator's windows() loop runs: the hooks live as long as
        # the model, which may be evaluated, or trained by another accumulator, in between.
        self.active = False
        where = {id(p): j for j, p in enumerate(params)}
        self.hooks = [m.register_forward_hook(self._recorder(where[id(m.weight)])) for m in modules]

    def _recorder(self, j: int):
        def record(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if self.active and torch.is_grad_enabled() and args and isinstance(args[0], torch.Tensor):
                self.ids[j].append(args[0].detach().reshape(-1))
        return record

    def between(self) -> None:
        for j, p in enumerate(self.params):
            ids, self.ids[j] = self.ids[j], []
            g = p.grad
            if g is None or j in self.dense:
                continue
            held = self.rows.pop(j, None)
            if held is not None:
                g.index_add_(0, held[0], held[1])  # now g is the whole accumulated gradient
                ids.append(held[0])
            if not ids or sum(t.numel() for t in ids) * 2 > g.shape[0]:
                continue  # mostly dense: rows would save nothing
            rows = torch.cat(ids).sort().values
            first = torch.ones_like(rows, dtype=torch.bool)
            first[1:] = rows[1:] != rows[:-1]
            if not self.sync_free:
                rows = rows[first]  # a data-dependent size: fine where there is no device to wait for
            values = g.index_select(0, rows)
            if self.sync_free:
                values = torch.where(first.unsqueeze(1), values, torch.zeros((), dtype=g.dtype, device=g.device))
            # Whatever is left outside the looked-up rows must be zero, or the rows miss some.
            rest = g.index_fill_(0, rows, 0).count_nonzero()
            if not self.sync_free:
                if int(rest):
                    g.index_add_(0, rows, values)  # undo the fill: those rows were zeroed
                    self.dense.add(j)  # used outside its lookups (tied, say): keep it dense
                    continue
            else:
                self.stray = rest if self.stray is None else self.stray + rest
            self.rows[j] = (rows, values)
            p.grad = None

    def _restore(self) -> None:
        for j in list(self.rows):
            p = self.params[j]
            idx, values = self.rows[j]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.index_add_(0, idx, values)
            del self.rows[j]

    def any_grad(self) -> bool:
        return bool(self.rows) or super().any_grad()

    def reducible(self) -> list[torch.Tensor]:
        self._restore()
        return super().reducible()

    def finalize(self, scale: Scale) -> list[torch.Tensor]:
        self._restore()
        return super().finalize(scale)

    def held(self) -> dict[int, torch.Tensor]:
        self._restore()  # the saved gradients are dense
        return super().held()

    def clear(self) -> None:
        super().clear()
        self.rows.clear()
        self.stray = None
        for ids in self.ids.values():
            ids.clear()

    def load(self, grads: dict[int, torch.Tensor]) -> None:
        self.clear()
        super().load(grads)

    def deferred(self) -> list[torch.Tensor]:
        return [] if self.stray is None else [self.stray]

    def check(self, values: list[float]) -> None:
        if values and values[0] > 0:
            raise RuntimeError(
                "compact_embedding_grads: an embedding weight received gradient outside the rows its "
                "nn.Embedding looked up (it is also used elsewhere, e.g. tied to an output layer by a "
                "function call); this window is not applied. Build the Accumulator without "
                "compact_embedding_grads for this model"
            )


def embedding_modules(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """``model``'s dense-gradient ``nn.Embedding`` layers whose weight belongs to them alone
    (a weight tied to an output layer gets a dense gradient: nothing to compact).

    >>> len(embedding_modules(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2))))
    1
    """
    names: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        names[id(p)] = names.get(id(p), 0) + 1
    seen: dict[int, torch.nn.Embedding] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and not m.sparse and m.weight.requires_grad and names.get(id(m.weight)) == 1:
            seen.setdefault(id(m.weight), m)
    return list(seen.values())


class Stores:
    """The stores of one accumulator, called together; each parameter belongs to one."""

    def __init__(self, stores: list[DenseStore]):
        self.stores = [s for s in stores if s.params]
        # The plain store does nothing per micro-batch: keep it off the hot path.
        self.held_elsewhere = [s for s in self.stores if type(s) is not DenseStore]

    def absorb(self) -> None:
        for s in self.held_elsewhere:
            s.absorb()

    def between(self) -> None:
        for s in self.held_elsewhere:
            s.between()

    def take(self) -> list:
        return [s.take() for s in self.stores]

    def put_back(self, held: list) -> None:
        for s, h in zip(self.stores, held):
            s.put_back(h)

    def merge(self, held: list) -> None:
        for s, h in zip(self.stores, held):
            s.merge(h)

    def any_grad(self) -> bool:
        return any(s.any_grad() for s in self.stores)

    def activate(self, on: bool) -> None:
        """Whether the stores watch forwards (a windows() loop is running)."""
        for s in self.held_elsewhere:
            s.active = on

    def materialize(self) -> None:
        for s in self.stores:
            s.materialize()

    def reducible(self) -> list[torch.Tensor]:
        return [g for s in self.stores for g in s.reducible()]

    def finalize(self, scale: Scale) -> list[torch.Tensor]:
        return [g for s in self.stores for g in s.finalize(scale)]

    def held(self) -> dict[int, torch.Tensor]:
        return {i: g for s in self.stores for i, g in s.held().items()}

    def load(self, grads: dict[int, torch.Tensor]) -> None:
        for s in self.stores:
            s.load(grads)

    def clear(self, dense: bool = True) -> None:
        """Forget every held gradient (``dense=False``: ``.grad`` was already cleared)."""
        for s in self.stores if dense else self.held_elsewhere:
            s.clear()

    def deferred(self) -> list[torch.Tensor]:
        return [t for s in self.held_elsewhere for t in s.deferred()]

    def check(self, values: list[float]) -> None:
        at = 0
        for s in self.held_elsewhere:
            n = len(s.deferred())
            s.check(values[at:at + n])
            at += n
