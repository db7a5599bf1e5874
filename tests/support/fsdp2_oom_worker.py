"""A rank of an FSDP2 run whose rank 0 runs out of memory (tests/engine/test_composition_matrix.py).

Rank 0 catches the error and, like a careless user, goes on to a collective: nothing may
hang. Argument: where the error is injected, "forward" or "backward".
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

import gradaccum
from support import matrix_cells as mc

torch.set_num_threads(1)
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
net = mc.CellLM()
net.oom.limit, net.oom.where = (2 if rank == 0 else 10**9), sys.argv[1]
model = fully_shard(net)
acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=3)
try:
    for window in acc.windows(mc.rank_data("counts", rank, 2)):
        for batch in window:
            window.forward_backward(batch, lambda b: mc.mean_loss(model, b))
        window.step()
except torch.OutOfMemoryError as exc:
    print(f"caught: {exc}", file=sys.stderr, flush=True)
    try:
        dist.barrier()
    except Exception as again:  # the other rank is gone: that is the point
        print(f"barrier: {type(again).__name__}", file=sys.stderr, flush=True)
    sys.exit(3)
print("finished without an error", file=sys.stderr)
