"""The Python blocks of README.md and docs/mindspore.md that use MindSpore, and what they leave
to the reader (a network, its loss, a dataset), for the tests that run them as written."""

from __future__ import annotations

import os
import re
import sys
import types

import mindspore as ms
import numpy as np
from mindspore import nn, ops

from reference import TokenNet, micro_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def blocks(page: str) -> list[str]:
    with open(os.path.join(ROOT, page)) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def mindspore_blocks() -> dict[str, list[str]]:
    """The MindSpore blocks by page (the test of the torch blocks leaves these here)."""
    return {"README.md": [c for c in blocks("README.md") if "gradaccum.mindspore" in c],
            "docs/mindspore.md": blocks("docs/mindspore.md")}


def harness(rank: int = 0) -> dict:
    """A token classifier, its mean loss over a micro-batch's tokens, and labelled micro-batches."""
    ms.set_seed(0)
    model = TokenNet()

    def forward_fn(data, label):
        logp = ops.log_softmax(model(data), -1)
        return -ops.gather_elements(logp, -1, label.expand_dims(-1)).mean()

    dataset = [(ms.Tensor(ids, ms.int32), ms.Tensor(targets, ms.int32))
               for ids, targets, _ in micro_batches([(2, 5), (3, 4), (1, 6), (2, 3), (4, 2), (1, 5)], seed=20 + rank)]
    optimizer = nn.SGD(model.trainable_params(), learning_rate=0.1)
    # A module of its own, as a pasted script would be: ms.jit looks its functions' module up.
    module = types.ModuleType(f"doc_sample_{rank}")
    sys.modules[module.__name__] = module
    module.__dict__.update(ms=ms, nn=nn, ops=ops, np=np, model=model, forward_fn=forward_fn, dataset=dataset,
                           optimizer=optimizer, grad_fn=ms.value_and_grad(forward_fn, None, optimizer.parameters), epochs=1)
    return module.__dict__


def run(code: str, ns: dict, where: str, name: str) -> None:
    """``code`` executed in ``ns`` from a file of its own: ``ms.jit`` reads a function's source."""
    path = os.path.join(where, f"{name}.py")
    with open(path, "w") as fh:
        fh.write(code)
    exec(compile(code, path, "exec"), ns)


DATA_PARALLEL = '''
@ms.jit
def train_step(data, label, num_items):
    loss, grads = grad_fn(data, label)
    return loss, accumulator(grads, num_items, loss)


@ms.jit
def flush():
    return accumulator.flush()


shard = dataset
micro_batches_on_this_rank = len(shard)
'''
