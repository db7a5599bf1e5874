"""Two pipeline stages x two data-parallel replicas on 4 CPU ranks, with
``torch.distributed.pipelining``, for ``tests/engine/test_pipeline.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from support.reference import VOCAB, make_sequences

ROWS, MICRO, LENGTH = 6, 3, 16  # each replica's step: 6 sequences padded to 16 tokens, 3 micro-batches of 2


class Front(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.w1 = torch.nn.Linear(dim, 2 * dim)

    def forward(self, ids):
        return torch.tanh(self.w1(self.emb(ids)))


class Back(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.w2 = torch.nn.Linear(2 * dim, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, h):
        return self.head(torch.tanh(self.w2(h)))


def stages() -> tuple[Front, Back]:
    torch.manual_seed(0)
    return Front(), Back()


def step_data(replica: int, step: int, rows: int = ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [rows, 16] and next-token targets (-100 past each sequence's end): very uneven tokens."""
    seqs = make_sequences(rows, seed=700 + 10 * replica + step, lo=2, hi=LENGTH)
    ids = torch.zeros(rows, LENGTH, dtype=torch.long)
    target = torch.full((rows, LENGTH), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        target[i, :len(s) - 1] = s[1:]
    return ids, target


def token_mean(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)


def runs(rank: int, world: int) -> dict:
    """GPipe and 1F1B with ExactLoss, and the stock GPipe, one after the other."""
    return {name: run(rank, world, schedule, exact)
            for name, schedule, exact in (("gpipe", "gpipe", True), ("1f1b", "1f1b", True), ("stock", "gpipe", False))}


def run(rank: int, world: int, schedule_name: str, exact: bool) -> dict:
    """Two steps of the schedule; each stage's gradient (averaged over the replicas) per step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from gradaccum.pipeline import ExactLoss

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    replica, stage_index = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    front, back = stages()
    module = front if stage_index == 0 else back
    stage = PipelineStage(module, stage_index, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    dp = mesh["dp"].get_group()
    loss_fn = ExactLoss(token_mean, lambda y: (y != -100).sum(), data_parallel=dp) if exact else token_mean
    cls = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule_name]
    schedule = cls(stage, n_microbatches=MICRO, loss_fn=loss_fn, scale_grads=not exact)
    seen = []
    for step in range(2):
        ids, target = step_data(replica, step)
        if stage_index == 0:
            schedule.step(ids)
        else:
            if exact:
                loss_fn.open(target)
            schedule.step(target=target, losses=[])
        grads = [p.grad for p in module.parameters()]
        for g in grads:  # average over the replicas, as DDP would
            dist.all_reduce(g, group=dp)
            g.div_(dist.get_world_size(dp))
        seen.append([g.detach().double().clone() for g in grads])
        module.zero_grad(set_to_none=True)
    return {"stage": stage_index, "seen": seen}


def reference(step: int) -> list[torch.Tensor]:
    """The float64 gradient of the mean next-token loss over both replicas' 12 sequences."""
    front, back = stages()
    front, back = front.double(), back.double()
    ids = torch.cat([step_data(r, step)[0] for r in range(2)])
    target = torch.cat([step_data(r, step)[1] for r in range(2)])
    token_mean(back(front(ids)), target).backward()
    return [p.grad.detach().clone() for p in list(front.parameters()) + list(back.parameters())]
