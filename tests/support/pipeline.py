"""Pipelines on 4 CPU ranks (two pipeline ranks x two data-parallel replicas) for
``tests/engine/test_pipeline.py``: ``torch.distributed.pipelining`` with two stages, or four
stages two per rank (the interleaved and V-shaped schedules), and DeepSpeed's ``PipelineEngine``;
on 8 ranks, two stages whose layers are split over two tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import gradaccum
from support.reference import VOCAB, RecordingSGD, make_sequences

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


class Piece(torch.nn.Module):
    """A quarter of the model (one layer, and the tanh after it where there is one)."""

    def __init__(self, layer: torch.nn.Module, tanh: bool):
        super().__init__()
        self.layer, self.tanh = layer, tanh

    def forward(self, x):
        y = self.layer(x)
        return torch.tanh(y) if self.tanh else y


def quarters() -> list[Piece]:
    """The same model as ``stages()``, in four stages."""
    front, back = stages()
    return [Piece(front.emb, False), Piece(front.w1, True), Piece(back.w2, True), Piece(back.head, False)]


MULTI_STAGE = ["ScheduleInterleaved1F1B", "ScheduleLoopedBFS", "ScheduleInterleavedZeroBubble",
               "ScheduleZBVZeroBubble", "ScheduleDualPipeV"]
V_SHAPED = {"ScheduleZBVZeroBubble", "ScheduleDualPipeV"}  # rank 0 holds the first and the last stage


def runs(rank: int, world: int, with_deepspeed: bool = False) -> dict:
    """GPipe and 1F1B with ExactLoss, the stock GPipe, then every multi-stage schedule with
    ExactLoss and the stock interleaved 1F1B, one after the other; then, where DeepSpeed is
    installed, its PipelineEngine (``deepspeed_runs``)."""
    import importlib.util

    out = {name: run(rank, world, schedule, exact)
           for name, schedule, exact in (("gpipe", "gpipe", True), ("1f1b", "1f1b", True), ("stock", "gpipe", False))}
    for name in MULTI_STAGE:
        out[name] = run_multi(rank, name, True)
    out["stock-interleaved"] = run_multi(rank, "ScheduleInterleaved1F1B", False)
    if with_deepspeed and importlib.util.find_spec("deepspeed") is not None:
        out["deepspeed"] = deepspeed_runs(rank, world)
    return out


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


def run_multi(rank: int, schedule_name: str, exact: bool) -> dict:
    """Two steps of a schedule with two of the four stages on each pipeline rank (stages r and
    r + 2, or r and 3 - r for the V-shaped ones), 4 micro-batches of 2; the gradients of this
    rank's stages, averaged over the replicas, by stage index."""
    import torch.distributed as dist
    from torch.distributed import pipelining
    from torch.distributed.device_mesh import init_device_mesh

    from gradaccum.pipeline import ExactLoss

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    replica, r = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    mine = [r, 3 - r] if schedule_name in V_SHAPED else [r, r + 2]
    pieces = quarters()
    stage_list = [pipelining.PipelineStage(pieces[i], i, 4, torch.device("cpu"), group=mesh["pp"].get_group())
                  for i in mine]
    dp = mesh["dp"].get_group()
    loss_fn = ExactLoss(token_mean, lambda y: (y != -100).sum(), data_parallel=dp) if exact else token_mean
    schedule = getattr(pipelining, schedule_name)(stage_list, n_microbatches=4, loss_fn=loss_fn,
                                                  scale_grads=not exact)
    seen = []
    for step in range(2):
        ids, target = step_data(replica, step, rows=8)
        last = {"target": target, "losses": []} if 3 in mine else {}
        if exact and 3 in mine:
            loss_fn.open(target)
        schedule.step(*([ids] if 0 in mine else []), **last)
        by_stage = {}
        for i in mine:
            grads = [p.grad for p in pieces[i].parameters()]
            for g in grads:
                dist.all_reduce(g, group=dp)
                g.div_(dist.get_world_size(dp))
            by_stage[i] = [g.detach().double().clone() for g in grads]
            pieces[i].zero_grad(set_to_none=True)
        seen.append(by_stage)
    return {"seen": seen}


MAX_NORM = 0.1  # below both steps' gradient norms (0.23, 0.21): every step is clipped


def run_3d(rank: int, world: int) -> dict:
    """1F1B on a ("dp", "pp", "tp") mesh of 2 x 2 x 2: the first stage's ``w1`` split by
    columns and the second's ``w2`` by rows over "tp" (the activation crosses stages as its
    tensor-parallel shard); the counts summed over "dp" only. Each stage's full gradient,
    averaged over the replicas and clipped to ``MAX_NORM`` by the whole model's norm, per step."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from gradaccum.pipeline import ExactLoss, clip_grad_norm_

    mesh = init_device_mesh("cpu", (2, 2, 2), mesh_dim_names=("dp", "pp", "tp"))
    replica, stage_index = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    front, back = stages()
    module = (parallelize_module(front, mesh["tp"], {"w1": ColwiseParallel()}) if stage_index == 0
              else parallelize_module(back, mesh["tp"], {"w2": RowwiseParallel()}))
    stage = PipelineStage(module, stage_index, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    dp = mesh["dp"].get_group()
    exact = ExactLoss(token_mean, lambda y: (y != -100).sum(), data_parallel=dp)
    schedule = Schedule1F1B(stage, n_microbatches=MICRO, loss_fn=exact, scale_grads=False)
    seen, norms = [], []
    for step in range(2):
        ids, target = step_data(replica, step)
        if stage_index == 0:
            schedule.step(ids)
        else:
            exact.open(target)
            schedule.step(target=target, losses=[])
        for p in module.parameters():
            local = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
            dist.all_reduce(local, group=dp)  # average over the replicas, shard by shard
            local.div_(dist.get_world_size(dp))
        norms.append(float(clip_grad_norm_(module.parameters(), MAX_NORM, stages=mesh["pp"].get_group())))
        seen.append([(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().double()
                     for p in module.parameters()])
        module.zero_grad(set_to_none=True)
    return {"stage": stage_index, "seen": seen, "norms": norms}


GAS, MICRO_ROWS = 3, 2  # DeepSpeed: each replica's step is 3 micro-batches of 2 sequences


def deepspeed_runs(rank: int, world: int) -> dict:
    """DeepSpeed's PipelineEngine, 2 stages x 2 replicas: with ExactLoss, then stock."""
    from support.deepspeed_workers import environment

    environment(rank, world)
    return {"exact": deepspeed_run(True), "stock": deepspeed_run(False)}


def deepspeed_run(exact: bool) -> dict:
    """Two ``train_batch`` steps; each stage's gradient when the optimizer steps (after the
    engine's own all-reduce over the replicas) and the loss ``train_batch`` returns."""
    import deepspeed
    from deepspeed.pipe import PipelineModule

    from gradaccum.pipeline import ExactLoss

    deepspeed.init_distributed(dist_backend="gloo")
    front, back = stages()
    loss_fn = ExactLoss(token_mean, lambda y: (y != -100).sum()) if exact else token_mean
    net = PipelineModule(layers=[front.emb, front.w1, torch.nn.Tanh(), back.w2, torch.nn.Tanh(), back.head],
                         num_stages=2, loss_fn=loss_fn, partition_method="uniform")
    optimizer = RecordingSGD(net.parameters(), lr=0.0)
    config = {"train_micro_batch_size_per_gpu": MICRO_ROWS, "gradient_accumulation_steps": GAS,
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, _, _, _ = deepspeed.initialize(model=net, optimizer=optimizer, config=config)
    replica = engine.grid.get_data_parallel_id()
    refused = None
    try:  # the Accumulator cannot drive train_batch(): it says what to use instead
        gradaccum.Accumulator(engine, optimizer, steps=GAS)
    except ValueError as exc:
        refused = str(exc)

    def micro_batches():
        for step in range(2):
            ids, target = step_data(replica, step)
            for i in range(0, ROWS, MICRO_ROWS):
                yield ids[i:i + MICRO_ROWS], target[i:i + MICRO_ROWS]

    batches = loss_fn.windows(micro_batches(), engine) if exact else micro_batches()
    losses = [float(engine.train_batch(batches)) for _ in range(2)]
    return {"stage": engine.stage_id, "seen": [[g.double() for g in step] for step in optimizer.seen],
            "loss": losses, "refused": refused}


def reference(step: int, rows: int = ROWS) -> tuple[list[torch.Tensor], float]:
    """The float64 gradient of the mean next-token loss over both replicas' sequences, and that loss."""
    front, back = stages()
    front, back = front.double(), back.double()
    ids = torch.cat([step_data(r, step, rows)[0] for r in range(2)])
    target = torch.cat([step_data(r, step, rows)[1] for r in range(2)])
    loss = token_mean(back(front(ids)), target)
    loss.backward()
    return [p.grad.detach().clone() for p in list(front.parameters()) + list(back.parameters())], float(loss.detach())
