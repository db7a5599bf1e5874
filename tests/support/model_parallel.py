"""Model-parallel layouts on 4 and 8 CPU ranks (gloo), for ``tests/engine/test_model_parallel.py``.

The model is per-token (embedding, an MLP whose two layers are split over the tensor-parallel
ranks, a head), so that padding cannot leak and a sequence can be cut along its tokens for
context parallelism with the next-token targets taken from the whole sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gradaccum
from support.matrix_cells import batch_of
from support.reference import VOCAB, RecordingSGD, micro_batches

# Each data-parallel group's micro-batches, k = 3 (HSDP's four ranks are four groups).
SIZES = [[3, 1, 4, 2, 2, 3], [2, 4, 1, 3, 2, 1], [1, 1, 5, 2, 3, 1], [4, 2, 1, 1, 1, 3]]


class MLPLM(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.w1 = torch.nn.Linear(dim, 2 * dim)
        self.w2 = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        return self.head(h + self.w2(torch.tanh(self.w1(h))))


def model() -> MLPLM:
    torch.manual_seed(0)
    return MLPLM()


def data(group: int) -> list[dict]:
    return [batch_of(mb) for mb in micro_batches(SIZES[group], seed=500 + group, lo=3, hi=20)]


def token_loss(m, ids, mask, lo: int = 0, hi: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token loss over the positions [lo, hi) of every row (all positions with a
    target by default) and their count: a context-parallel rank computes its slice only."""
    T = ids.shape[1] - 1
    hi = T if hi < 0 else min(hi, T)
    logits = m(ids[:, lo:hi])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, lo + 1:hi + 1].reshape(-1), reduction="none")
    valid = mask[:, lo + 1:hi + 1].reshape(-1).float()
    count = valid.sum()
    return (ce * valid).sum() / count.clamp(min=1), count


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run(rank: int, world: int, layout: str) -> dict:
    """``tp``: FSDP2 over "dp" x tensor parallel over "tp" (first, the Accumulator built without
    ``data_parallel``: refused); ``cp``: each sequence's tokens cut over "cp", FSDP2 over "dp"
    and "cp" flattened; ``3d``: both on 8 ranks, "dp" x "cp" x "tp"; ``hsdp``: FSDP2 over a
    ("replicate", "shard") mesh, every rank data-parallel."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    names = {"tp": ("dp", "tp"), "cp": ("dp", "cp"), "3d": ("dp", "cp", "tp"), "hsdp": ("replicate", "shard")}[layout]
    mesh = init_device_mesh("cpu", (2,) * len(names), mesh_dim_names=names)
    net = model()
    if "tp" in names:
        parallelize_module(net, mesh["tp"], {"w1": ColwiseParallel(), "w2": RowwiseParallel()})
    if layout == "hsdp":  # replicated over one dimension, sharded over the other: both data-parallel
        m, data_parallel = fully_shard(net, mesh=mesh), mesh
    elif "cp" in names:
        m, data_parallel = fully_shard(net, mesh=mesh[("dp", "cp")]._flatten()), mesh[("dp", "cp")]
    else:
        m, data_parallel = fully_shard(net, mesh=mesh["dp"]), mesh["dp"]
    opt = RecordingSGD(m.parameters(), lr=0.0)
    refused = None
    if layout != "cp":  # a mesh of several dimensions, nothing said about which are data-parallel
        try:
            gradaccum.Accumulator(m, opt, steps=3)
        except ValueError as exc:
            refused = str(exc)
    acc = gradaccum.Accumulator(m, opt, steps=3, max_grad_norm=0.05, data_parallel=data_parallel)
    group = rank if layout == "hsdp" else mesh["dp"].get_local_rank()
    part = mesh["cp"].get_local_rank() if "cp" in names else None
    reports = []
    for window in acc.windows(data(group)):
        for b in window:
            if part is None:
                loss, n = token_loss(m, b["ids"], b["mask"])
            else:  # this rank's half of every sequence's positions
                half = (b["ids"].shape[1] - 1 + 1) // 2
                loss, n = token_loss(m, b["ids"], b["mask"], *((0, half) if part == 0 else (half, -1)))
            window.backward(loss, num_items=n)
        reports.append(window.step())
    return {"seen": [[_full(g).detach().double() for g in step] for step in opt.seen],
            "num_items": [r.num_items for r in reports], "norms": [r.grad_norm for r in reports], "refused": refused}


def reference(windows: list[list[dict]]) -> list[list[torch.Tensor]]:
    """Each window's float64 gradient of the mean next-token loss over every sequence of both
    data-parallel groups, the model whole."""
    out = []
    for batches in windows:
        m = model().double()
        total = sum(token_loss(m, b["ids"], b["mask"])[1] for b in batches)
        loss = sum(token_loss(m, b["ids"], b["mask"])[0] * token_loss(m, b["ids"], b["mask"])[1] for b in batches) / total
        loss.backward()
        out.append([p.grad.detach().clone() for p in m.parameters()])
    return out
