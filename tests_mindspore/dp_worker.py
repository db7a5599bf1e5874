"""One msrun worker of test_graph's data-parallel test: train, then save what it reached.

Each rank accumulates its own micro-batches (uneven sizes, and a different number of
them per rank) and closes every window with one reduce, counted by a wrapping cell.
"""

from __future__ import annotations

import os
import sys

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.communication import get_rank

from gradaccum.mindspore import Accumulator, AccumulatorCell, flushes_needed

from reference import Setup, initial_weights, micro_batches, tensors

_S = [(2, 9), (5, 3), (1, 12), (3, 6), (4, 2), (2, 7), (1, 5), (3, 4)]
# name -> micro-batch shapes of each rank, window size, and how the step runs
CASES = {
    "jit_whole_window_fewer": {"sizes": [_S[:7], _S[1:5]], "steps": 3, "mode": "jit"},
    "jit_empty_last_window": {"sizes": [_S[:7], _S[2:8]], "steps": 3, "mode": "jit"},
    "pynative_shorter_last_window": {"sizes": [_S[:7], _S[1:7]], "steps": 4, "mode": "pynative"},
}


class CountingAllReduce(nn.Cell):
    """The default reducer, counting its calls in a parameter (so also inside a graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.all_reduce = ops.AllReduce()
        self.calls = Parameter(Tensor(0, ms.int32), name="calls", requires_grad=False)

    def construct(self, x):
        ops.assign_add(self.calls, Tensor(1, ms.int32))
        return self.all_reduce(x)


def run(name: str, spec: dict, rank: int, out: str) -> None:
    data = micro_batches(spec["sizes"][rank], seed=10 + rank)
    s = Setup(initial_weights())
    reducer = CountingAllReduce()
    k = spec["steps"]
    flushes = flushes_needed(len(data), k)  # a collective: while the ranks are in step
    if spec["mode"] == "jit":
        cell = AccumulatorCell(s.opt, steps=k, reducer=reducer)
        grad_fn = ms.value_and_grad(s.loss_fn, None, s.opt.parameters)

        @ms.jit
        def train_step(ids, targets, mask):
            loss, grads = grad_fn(ids, targets, mask)
            return loss, cell(grads, mask.sum(), loss)

        @ms.jit
        def flush():
            return cell.flush()

        for b in data:
            train_step(*tensors(b))
    else:
        acc = Accumulator(s.opt, steps=k, reducer=reducer)
        cell = acc.cell
        for b in data:
            loss, grads = s.grads(b)
            acc(grads, num_items=int(b[2].sum()), loss=loss)
        flush = acc.flush
    flushed = [bool(flush()) for _ in range(flushes)]
    assert int(reducer.calls.asnumpy()) == cell.reductions
    np.savez(os.path.join(out, f"{name}_rank{rank}.npz"), **s.weights(), reductions=int(reducer.calls.asnumpy()),
             micro_batches=len(data), last_items=cell.last_items, flushed=np.array(flushed, np.bool_))


def docs_block(out: str) -> None:
    """docs/mindspore.md's data-parallel block as written, over the names it leaves to the
    reader: it sets the device and starts the communication itself, so it runs first."""
    from doc_samples import DATA_PARALLEL, harness, mindspore_blocks, run

    code = next(c for c in mindspore_blocks()["docs/mindspore.md"] if "init()" in c)
    ns = harness()
    tag = os.environ.get("MS_NODE_ID", str(os.getpid()))
    run(DATA_PARALLEL, ns, out, f"harness{tag}")
    run(code, ns, out, f"block{tag}")
    np.savez(os.path.join(out, f"docs_rank{get_rank()}.npz"), windows=ns["accumulator"].windows,
             reductions=ns["accumulator"].reductions)


if __name__ == "__main__":
    docs_block(os.environ["GA_OUT"])  # ms.set_device("CPU") and init(), as the page does
    for case_name, case in CASES.items():
        run(case_name, case, get_rank(), os.environ["GA_OUT"])
    sys.exit(0)
