"""Pipeline parallel: what ``gradaccum.pipeline.ExactLoss`` costs against the stock loss.

Four CPU ranks (gloo): 2 pipeline stages x 2 data-parallel replicas, a small transformer
language model cut in two (embedding and two encoder layers, then two layers and the head),
steps of 8 variable-length sequences per replica in 4 micro-batches. Two loops, the same
schedule and data:

- ``stock``: the schedule's default, each micro-batch's token mean, gradients divided by the
  number of micro-batches (``scale_grads=True``): the mean of per-micro-batch means;
- ``exact``: ``ExactLoss`` with ``scale_grads=False``: the step's targets counted at the
  last stage and summed over the replicas (one small all-reduce), each micro-batch weighed
  by its share.

Both then average each stage's gradient over the replicas and take an SGD step. The loops
alternate step by step in the same processes (these machines are noisy); the median seconds
per step of each and their ratio are printed, for GPipe and 1F1B. Before timing, both
compute the gradient of the same first steps from the same weights: the stock gradient's
relative error against the exact one (which the tests check against the float64 big batch)
is printed beside the times, median over 8 steps.

    python benchmarks/pipeline.py [--steps 20] [--dim 256]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import gradaccum

VOCAB, ROWS, MICRO, LENGTH = 2000, 8, 4, 96


class Half(torch.nn.Module):
    """Two encoder layers, with the embedding in front (first half) or the head after (second)."""

    def __init__(self, dim: int, first: bool):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.emb = torch.nn.Embedding(VOCAB, dim) if first else None
        self.head = None if first else torch.nn.Linear(dim, VOCAB)

    def forward(self, x):
        h = self.enc(self.emb(x) if self.emb is not None else x)
        return self.head(h) if self.head is not None else h


def step_data(replica: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [8, 96] and next-token targets, -100 past each sequence's end (4 to 96 tokens)."""
    g = torch.Generator().manual_seed(1000 * replica + step)
    ids = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    target = torch.full((ROWS, LENGTH), -100, dtype=torch.long)
    for i, n in enumerate(torch.randint(4, LENGTH + 1, (ROWS,), generator=g).tolist()):
        target[i, :n - 1] = ids[i, 1:n]
    return ids, target


def token_mean(logits, target):
    return F.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1), ignore_index=-100)


def worker(rank: int, world: int, port: int, steps: int, dim: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from gradaccum.pipeline import ExactLoss

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "pp"))
    replica, s = mesh["dp"].get_local_rank(), mesh["pp"].get_local_rank()
    dp = mesh["dp"].get_group()
    torch.manual_seed(s)
    module = Half(dim, first=s == 0)
    optimizer = torch.optim.SGD(module.parameters(), lr=1e-3)
    stage = PipelineStage(module, s, 2, torch.device("cpu"), group=mesh["pp"].get_group())
    exact = ExactLoss(token_mean, lambda y: (y != -100).sum(), data_parallel=dp)
    results = {}
    for name, cls in (("gpipe", ScheduleGPipe), ("1f1b", Schedule1F1B)):
        loops = {"stock": cls(stage, n_microbatches=MICRO, loss_fn=token_mean, scale_grads=True),
                 "exact": cls(stage, n_microbatches=MICRO, loss_fn=exact, scale_grads=False)}

        def gradient(loop: str, step: int) -> list[torch.Tensor]:
            ids, target = step_data(replica, step)
            if s == 0:
                loops[loop].step(ids)
            else:
                if loop == "exact":
                    exact.open(target)
                loops[loop].step(target=target, losses=[])
            for p in module.parameters():
                dist.all_reduce(p.grad, group=dp)
                p.grad /= 2
            return [p.grad for p in module.parameters()]

        errors = []
        for step in range(8):
            stock = [g.double().clone() for g in gradient("stock", step)]
            optimizer.zero_grad(set_to_none=True)
            want = [g.double() for g in gradient("exact", step)]
            optimizer.zero_grad(set_to_none=True)
            # Both stages' parts of the whole model's norms: summed over the pipeline ranks.
            sums = torch.stack([sum((a - b).pow(2).sum() for a, b in zip(stock, want)),
                                sum(b.pow(2).sum() for b in want)])
            dist.all_reduce(sums, group=mesh["pp"].get_group())
            errors.append(float((sums[0] / sums[1]).sqrt()))
        times: dict[str, list[float]] = {"stock": [], "exact": []}
        for step in range(steps + 2):  # the first two rounds warm up
            for loop in ("stock", "exact") if step % 2 == 0 else ("exact", "stock"):
                dist.barrier()
                start = time.perf_counter()
                gradient(loop, step)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                dist.barrier()
                if step >= 2:
                    times[loop].append(time.perf_counter() - start)
        results[name] = {**{k: statistics.median(v) for k, v in times.items()}, "error": statistics.median(errors)}
    if rank == 0:
        out.update(results)
    dist.barrier()
    gradaccum.end_rank()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dim", type=int, default=256)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(4, port, args.steps, args.dim, out), nprocs=4)
        results = dict(out)
    print(f"4 CPU ranks (2 stages x 2 replicas), {MICRO} micro-batches of {ROWS // MICRO} sequences per replica, "
          f"dim {args.dim}, {args.steps} steps each, alternated")
    print(f"{'schedule':10s} {'stock s/step':>13s} {'exact s/step':>13s} {'exact/stock':>12s} {'stock error':>12s}")
    for name, r in results.items():
        print(f"{name:10s} {r['stock']:13.4f} {r['exact']:13.4f} {r['exact'] / r['stock']:12.3f} {r['error']:12.3f}")


if __name__ == "__main__":
    main()
