"""Embedding gradients held as their non-zero rows between micro-batches.

A micro-batch touches few rows of a word-embedding matrix (MiniLM: at most 2,048 of 30,522
rows for 16 x 128 tokens), yet its gradient is a dense matrix, and accumulation holds that
matrix through the next micro-batch's forward, where activations peak. Holding only the
touched rows (their indices and values) until the window's last micro-batch removes the
matrix from that peak. It is exact: each element is still the sum of the same micro-batch
gradients (floating-point addition is commutative, so even the bits agree with
accumulating in ``.grad``).

The invariant: the accumulated gradient of a parameter is ``p.grad`` (zero when None) plus
its held rows. Every change below keeps it, one statement at a time, so that an error
half-way (an out-of-memory error, say) loses nothing.
"""

from __future__ import annotations

from typing import Iterable

import torch


class CompactRows:
    """Holds the accumulated gradients of some 2-D parameters as (row indices, rows)."""

    def __init__(self, params: Iterable[torch.nn.Parameter]):
        self.params = list(params)
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def compact(self) -> None:
        """Move each parameter's gradient into held rows; dense gradients stay dense."""
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            held = self.rows.get(i)
            if held is not None:
                g.index_add_(0, held[0], held[1])  # now g is the whole accumulated gradient
                del self.rows[i]
            # inf-norm per row: no full-size temporary; NaN and inf rows count as touched.
            touched = torch.linalg.vector_norm(g, ord=float("inf"), dim=1).ne(0).nonzero().squeeze(1)
            if touched.numel() * 2 > g.shape[0]:
                continue  # mostly dense (a tied output layer, say): rows would save nothing
            values = g.index_select(0, touched)
            self.rows[i] = (touched, values)
            p.grad = None

    def restore(self) -> None:
        """Put the held rows back into ``.grad`` (dense), before anything reads it."""
        for i in list(self.rows):
            p = self.params[i]
            idx, values = self.rows[i]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.index_add_(0, idx, values)
            del self.rows[i]

    def clear(self) -> None:
        """Forget the held rows (the gradients were cleared)."""
        self.rows.clear()


def embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The dense-gradient weights of ``model``'s ``nn.Embedding`` layers.

    >>> embedding_weights(torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 2)))[0].shape
    torch.Size([10, 4])
    """
    seen: dict[int, torch.nn.Parameter] = {}
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and not m.sparse and m.weight.requires_grad:
            seen[id(m.weight)] = m.weight
    return list(seen.values())
