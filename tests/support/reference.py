"""Independent big-batch references for the tests.

Every reference computes the loss of the whole window at once, in float64, on a deep copy
of the model: never the accumulation formula rearranged.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VOCAB = 37


class TinyLM(torch.nn.Module):
    """A per-token language model: padding cannot leak between positions."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.proj(self.emb(ids))))


def make_sequences(n: int, seed: int = 0, lo: int = 2, hi: int = 24) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    return [torch.randint(0, VOCAB, (int(L),), generator=g) for L in lengths]


def micro_batches(sizes: list[int], seed: int, lo: int = 2, hi: int = 24) -> list[list[torch.Tensor]]:
    """Variable-length sequences (``lo`` to ``hi`` tokens) grouped into micro-batches of the given sizes."""
    seqs = make_sequences(sum(sizes), seed=seed, lo=lo, hi=hi)
    out, i = [], 0
    for s in sizes:
        out.append(seqs[i : i + s])
        i += s
    return out


def pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    device = seqs[0].device  # on the sequences' device: a GPU run pads on the GPU
    ids = torch.zeros(len(seqs), T, dtype=torch.long, device=device)
    mask = torch.zeros(len(seqs), T, device=device)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def lm_terms(model: torch.nn.Module, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss over a padded batch, and the number of predicted tokens."""
    ids, mask = pad(seqs)
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].reshape(-1).to(ce.dtype)
    return (ce * valid).sum(), valid.sum()


def lm_mean_loss(model: torch.nn.Module, seqs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    total, count = lm_terms(model, seqs)
    return total / count, int(count)


def f64_grads(model: torch.nn.Module, loss_of) -> list[torch.Tensor]:
    """Gradients of ``loss_of(copy)`` on a float64 copy of ``model``, in parameter order."""
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    loss_of(ref).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]


def big_batch_lm_grads(model: torch.nn.Module, window_seqs: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Gradient of the mean next-token loss over every sequence of a window, as one batch."""
    allseqs = [s for mb in window_seqs for s in mb]

    def loss_of(m):
        total, count = lm_terms(m, allseqs)
        return total / count

    return f64_grads(model, loss_of)


def rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    num = sum(float((g.double() - w.double()).pow(2).sum()) for g, w in zip(got, want))
    den = sum(float(w.double().pow(2).sum()) for w in want)
    return (num / den) ** 0.5


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients it was handed at each step."""

    def __init__(self, params, lr: float = 0.1, **kw):
        super().__init__(params, lr=lr, **kw)
        self.seen: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([
            p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for g in self.param_groups for p in g["params"]
        ])
        return super().step(closure)


class OOMAbove(torch.nn.Module):
    """Raises out-of-memory in forward or backward for batches larger than ``limit``."""

    def __init__(self, limit: int = 10**9, where: str = "forward"):
        super().__init__()
        self.limit, self.where, self.raised = limit, where, 0

    def forward(self, x):
        if self.where == "forward" and x.shape[0] > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError("injected: out of memory in forward")
        return _BackwardOOM.apply(x, self) if self.where == "backward" else x


class _BackwardOOM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, owner):
        ctx.owner = owner
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if grad.shape[0] > ctx.owner.limit:
            ctx.owner.raised += 1
            raise torch.OutOfMemoryError("injected: out of memory in backward")
        return grad, None
