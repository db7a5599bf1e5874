"""A rank of an FSDP2 run under ``torchrun --max-restarts 1`` whose rank 0 runs out of memory
in the second window (tests/engine/test_composition_matrix.py).

Each window boundary is checkpointed (full state, written by rank 0). The failing rank
records the split its error suggests; the restarted ranks load the checkpoint, split their
micro-batches that way, and finish. Argument: the checkpoint directory.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_model_state_dict, set_model_state_dict)
from torch.distributed.fsdp import fully_shard

import gradaccum
from support import matrix_cells as mc

K, LR, LIMIT = 3, 0.5, 4
torch.set_num_threads(1)
ckdir = sys.argv[1]
attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
# A store per attempt: with gloo on the CPU, a restarted group read the last attempt's peer
# addresses from the shared rendezvous store and failed to connect.
dist.init_process_group("gloo", init_method=f"file://{ckdir}/store-{attempt}",
                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
rank = dist.get_rank()
torch.manual_seed(0)
net = mc.CellLM()
net.oom.limit = LIMIT if rank == 0 else 10**9  # rank 0's 5-sequence micro-batch does not fit
model = fully_shard(net)
opt = torch.optim.SGD(model.parameters(), lr=LR)
acc = gradaccum.Accumulator(model, opt, steps=K)
full = StateDictOptions(full_state_dict=True, cpu_offload=True)
path, parts_file = os.path.join(ckdir, "checkpoint.pt"), os.path.join(ckdir, "parts")
if os.path.exists(path):
    saved = torch.load(path, weights_only=False)
    set_model_state_dict(model, saved["model"], options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    acc.load_state_dict(saved["accumulator"])
if os.path.exists(parts_file):
    acc.state.parts = int(open(parts_file).read())
data = mc.rank_data("counts", rank, 2)[acc.state.optimizer_step * K:]
try:
    for window in acc.windows(data):
        for batch in window:
            window.forward_backward(batch, lambda b: mc.mean_loss(model, b))
        window.step()
        weights = get_model_state_dict(model, options=full)  # a collective: every rank calls it
        if rank == 0:
            torch.save({"model": weights, "accumulator": acc.state_dict()}, path + ".tmp")
            os.replace(path + ".tmp", path)
        dist.barrier()
except torch.OutOfMemoryError as exc:
    with open(parts_file, "w") as fh:
        fh.write(str(exc.parts))
    print(f"rank {rank}: {exc}", file=sys.stderr, flush=True)
    sys.exit(1)
weights = get_model_state_dict(model, options=full)
if rank == 0:
    torch.save({"weights": weights, "attempt": attempt,
                "parts": acc.state.parts, "steps": acc.state.optimizer_step}, os.path.join(ckdir, "final.pt"))
dist.barrier()
gradaccum.end_rank()  # exit 0 once written (a finished rank can abort in gloo's teardown)
