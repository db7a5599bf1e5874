"""Gradient all-reduces per optimizer step under DDP: gradaccum, the seeds' loop, Accelerate.

Two CPU ranks (gloo), k=4 micro-batches per optimizer step, the 784-256-10 MLP. A DDP
communication hook counts every gradient all-reduce and its bytes; gradaccum's one small
all-reduce of the window's item count and loss sum (float64) is counted separately.

    python benchmarks/comm.py [--steps 8]
"""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradaccum

K = 4
_ALL_REDUCE = dist.all_reduce  # bound now: gradaccum_loop counts calls made through dist.all_reduce


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


def _data(rank, n):
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(32, 784, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(n)]


def _counting_hook(log):
    def hook(state, bucket):
        buf = bucket.buffer()
        log.append(buf.numel() * buf.element_size())
        world = dist.get_world_size()
        return _ALL_REDUCE(buf, async_op=True).get_future().then(lambda f: f.value()[0] / world)

    return hook


def seeds_loop(rank, steps):
    model = DDP(_mlp())
    log = []
    model.register_comm_hook(None, _counting_hook(log))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i, (x, y) in enumerate(_data(rank, steps * K)):
        (F.cross_entropy(model(x), y) / K).backward()
        if (i + 1) % K == 0:
            opt.step()
            opt.zero_grad()
    return log, 0


def gradaccum_loop(rank, steps):
    model = DDP(_mlp())
    log = []
    model.register_comm_hook(None, _counting_hook(log))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    acc = gradaccum.Accumulator(model, opt, steps=K)
    small = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *a, **kw):  # gradaccum's own collectives (counts, loss sums)
        small.append(tensor.numel() * tensor.element_size())
        return real_all_reduce(tensor, *a, **kw)

    import gradaccum.engine.parallel as sync

    sync.dist.all_reduce = counting_all_reduce
    try:
        for window in acc.windows(_data(rank, steps * K)):
            for x, y in window:
                window.backward(F.cross_entropy(model(x), y), num_items=len(y))
            window.step()
    finally:
        sync.dist.all_reduce = real_all_reduce
    return log, sum(small)


def accelerate_loop(rank, steps):
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=K, cpu=True)
    model, opt = accelerator.prepare(_mlp(), torch.optim.SGD(_mlp().parameters(), lr=0.01))
    log = []
    model.register_comm_hook(None, _counting_hook(log))
    for x, y in _data(rank, steps * K):
        with accelerator.accumulate(model):
            accelerator.backward(F.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
    return log, 0


def _worker(rank, world, port, steps, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    methods = {"seeds' loop (loss / k, DDP)": seeds_loop, "gradaccum": gradaccum_loop}
    try:
        import accelerate  # noqa: F401

        methods["Accelerate accumulate()"] = accelerate_loop
    except ImportError:
        pass
    results = {}
    for name, fn in methods.items():
        log, small = fn(rank, steps)
        results[name] = (len(log) / steps, sum(log) / steps, small / steps)
    if rank == 0:
        queue.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_worker, args=(2, port, args.steps, queue), nprocs=2)
    results = queue.get()
    base = results["seeds' loop (loss / k, DDP)"]
    print(f"2 ranks (gloo), k={K}, 784-256-10 MLP, per optimizer step:")
    print(f"{'method':<30} {'grad all-reduces':>16} {'grad bytes':>12} {'other bytes':>12} {'bytes vs seeds':>15}")
    for name, (calls, nbytes, small) in results.items():
        print(f"{name:<30} {calls:>16.2f} {nbytes:>12.0f} {small:>12.0f} {(nbytes + small) / base[1]:>15.3f}")


if __name__ == "__main__":
    main()
