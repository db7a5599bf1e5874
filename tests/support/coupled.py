"""Shared pieces of the coupled-loss tests: a tiny bi-encoder, pair data, InfoNCE, and the
float64 big-batch reference (every pair of the window scored against every other)."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

VOCAB = 40


class BiEncoder(torch.nn.Module):
    """Mean-pooled embeddings, an MLP, and a learnable temperature (like CLIP's logit scale)."""

    def __init__(self, dim: int = 16, dropout: float = 0.0, towers: int = 1):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.towers = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(dim, dim))
            for _ in range(towers))
        self.log_scale = torch.nn.Parameter(torch.tensor(2.0))

    def embed(self, ids: torch.Tensor, mask: torch.Tensor, tower: int = 0) -> torch.Tensor:
        m = mask.to(self.emb.weight.dtype).unsqueeze(-1)
        pooled = (self.emb(ids) * m).sum(1) / m.sum(1)
        return F.normalize(self.towers[tower](pooled), dim=-1)

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.embed(batch["q"], batch["q_mask"], 0)
        d = self.embed(batch["d"], batch["d_mask"], len(self.towers) - 1)
        return q, d


def info_nce(q: torch.Tensor, d: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Each query against every document of the batch; its own pair is the positive."""
    logits = (q @ d.T) * log_scale.exp().to(q.dtype)
    return F.cross_entropy(logits.float(), torch.arange(len(q), device=q.device))


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    return ids, mask


def pair_batches(sizes: list[int], seed: int = 0) -> list[dict]:
    """Micro-batches of (query, document) pairs of very uneven lengths, sizes as given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        qs = [torch.randint(1, VOCAB, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g) for _ in range(n)]
        ds = [torch.randint(1, VOCAB, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g) for _ in range(n)]
        (q, qm), (d, dm) = _pad(qs), _pad(ds)
        out.append({"q": q, "q_mask": qm, "d": d, "d_mask": dm})
    return out


def _cat_padded(batches: list[dict], key: str) -> tuple[torch.Tensor, torch.Tensor]:
    seqs = [row[mask.bool()] for b in batches for row, mask in zip(b[key], b[key + "_mask"])]
    return _pad(seqs)


def one_batch(batches: list[dict]) -> dict:
    """The window's micro-batches as one big batch, re-padded to one width."""
    (q, qm), (d, dm) = _cat_padded(batches, "q"), _cat_padded(batches, "d")
    return {"q": q, "q_mask": qm, "d": d, "d_mask": dm}


def big_batch_grads(model: torch.nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    """The float64 gradient of InfoNCE over the whole window as one batch."""
    ref = copy.deepcopy(model).double()
    ref.zero_grad(set_to_none=True)
    q, d = ref(one_batch(batches))
    info_nce(q, d, ref.log_scale).backward()
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]
