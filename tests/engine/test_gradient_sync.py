"""The gradient sync is skipped on all but the last micro-batch of a window."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradaccum
from support.reference import RecordingSGD, f64_grads, rel_error


def test_ddp_all_reduces_once_per_window(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
        ref_net = __import__("copy").deepcopy(net)
        model = DDP(net)
        calls = []

        def counting_hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        model.register_comm_hook(None, counting_hook)
        opt = RecordingSGD(model.parameters(), lr=0.0)
        acc = gradaccum.Accumulator(model, opt, steps=4)
        x, y = torch.randn(20, 5), torch.randint(0, 2, (20,))
        sizes = [3, 5, 2, 4, 6]  # windows of 4 and 1 micro-batches
        mbs, i = [], 0
        for s in sizes:
            mbs.append((x[i : i + s], y[i : i + s]))
            i += s
        per_window = []
        for window in acc.windows(mbs):
            before = len(calls)
            for xb, yb in window:
                window.backward(F.cross_entropy(model(xb), yb), num_items=len(yb))
            window.step()
            per_window.append(len(calls) - before)
        buckets = len(set(calls))
        assert per_window == [buckets, buckets]
        want = f64_grads(ref_net, lambda m: F.cross_entropy(m(x[:14].double()), y[:14]))
        assert rel_error(opt.seen[0], want) < 1e-6
    finally:
        # DDP's reducer holds the process group: free it while the group is alive, or its
        # destructor may wait on the group's threads at exit.
        model = acc = None  # noqa: F841
        import gc

        gc.collect()
        dist.destroy_process_group()
