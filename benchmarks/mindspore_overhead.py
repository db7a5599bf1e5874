"""Time per update in graph mode: gradaccum's AccumulatorCell against the seeds' accumulator.

The seeds' ``Accumulator`` (parameters and ``ops.assign_add``, the optimizer called when
the counter says so) is written here as the ``nn.Cell`` it has to be to run inside a
compiled step. Both train the same MLP with the same optimizer, the whole step under
``@ms.jit``; the two alternate update by update (this machine is noisy, drift between whole
runs swamps a few percent). Prints the median milliseconds per update of each and their
ratio, with the median and range of the ratios over blocks of updates. Target: ratio <= 1.05.

Run in the MindSpore environment (numpy < 2, no torch):

    .venv-ms/bin/python benchmarks/mindspore_overhead.py [--blocks 10] [--updates 20] [--clip]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops

from gradaccum.mindspore import AccumulatorCell


class SeedsAccumulator(nn.Cell):
    """The seeds' class, as a cell: sum the raw gradients, step every ``accum_steps`` calls."""

    def __init__(self, optimizer, accum_steps: int) -> None:
        super().__init__()
        self.optimizer = optimizer
        self.accum_steps = accum_steps
        self.inner_grads = optimizer.parameters.clone(prefix="accum_", init="zeros")
        self.counter = Parameter(Tensor(0, ms.int32), "counter_")

    def construct(self, grads):
        for buf, g in zip(self.inner_grads, grads):
            ops.assign_add(buf, g)
        if (self.counter + 1) % self.accum_steps == 0:
            self.optimizer(self.inner_grads)
            for buf in self.inner_grads:
                ops.assign(buf, ops.zeros_like(buf))
        ops.assign_add(self.counter, 1)
        return self.counter


def build(seed: int, width: int):
    ms.set_seed(seed)
    net = nn.SequentialCell(nn.Dense(784, width), nn.ReLU(), nn.Dense(width, width), nn.ReLU(), nn.Dense(width, 10))
    optimizer = nn.Adam(net.trainable_params(), learning_rate=1e-3)

    def forward(x, y):
        return ops.cross_entropy(net(x), y)

    return optimizer, ms.value_and_grad(forward, None, optimizer.parameters)


def make_steps(k: int, width: int, clip: bool):
    opt_a, grad_a = build(0, width)
    seeds = SeedsAccumulator(opt_a, k)
    opt_b, grad_b = build(0, width)
    exact = AccumulatorCell(opt_b, steps=k, max_grad_norm=1.0 if clip else None)

    @ms.jit
    def seeds_step(x, y):
        loss, grads = grad_a(x, y)
        seeds(grads)
        return loss

    @ms.jit
    def exact_step(x, y, n):
        loss, grads = grad_b(x, y)
        exact(grads, n, loss)
        return loss

    return seeds_step, exact_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--updates", type=int, default=20, help="updates per block")
    parser.add_argument("--k", type=int, default=4, help="micro-batches per update")
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--clip", action="store_true", help="gradaccum also clips the window's gradient")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE)
    rng = np.random.default_rng(0)
    data = [(Tensor(rng.normal(size=(args.micro_batch, 784)).astype(np.float32)),
             Tensor(rng.integers(0, 10, args.micro_batch).astype(np.int32))) for _ in range(args.k)]
    n = Tensor(float(args.micro_batch), ms.float32)
    seeds_step, exact_step = make_steps(args.k, args.width, args.clip)
    runs = {"seeds": lambda x, y: seeds_step(x, y), "gradaccum": lambda x, y: exact_step(x, y, n)}

    def update(name: str) -> float:
        fn = runs[name]
        start = time.perf_counter()
        for x, y in data:
            loss = fn(x, y)
        loss.asnumpy()  # wait for the update
        return time.perf_counter() - start

    for name in runs:  # compile and warm up
        for _ in range(3):
            update(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(args.blocks * args.updates):
        # Update by update, the first of each pair flipping: drift hits both alike.
        for name in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
            times[name].append(update(name))
    per = args.updates
    ratios = [statistics.median(times["gradaccum"][b:b + per]) / statistics.median(times["seeds"][b:b + per])
              for b in range(0, len(times["seeds"]), per)]
    seeds_ms = statistics.median(times["seeds"]) * 1e3
    exact_ms = statistics.median(times["gradaccum"]) * 1e3
    print(f"MLP 784-{args.width}-{args.width}-10, micro-batch {args.micro_batch}, k={args.k}, "
          f"Adam, GRAPH_MODE{', gradaccum clips' if args.clip else ''}")
    print(f"seeds' accumulator: {seeds_ms:.2f} ms/update   gradaccum: {exact_ms:.2f} ms/update")
    print(f"ratio gradaccum / seeds: {exact_ms / seeds_ms:.3f} (medians over all updates; "
          f"per block of {per}: median {statistics.median(ratios):.3f}, "
          f"range {min(ratios):.3f}-{max(ratios):.3f}); target <= 1.05")


if __name__ == "__main__":
    main()
