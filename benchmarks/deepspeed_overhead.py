"""gradaccum over a DeepSpeed engine against DeepSpeed's own loop, 2 CPU ranks, same k.

Run: torchrun --standalone --nproc-per-node 2 benchmarks/deepspeed_overhead.py [--stage 2] [--k 4]

Both loops train the same engine in the same processes, alternated window by window (these
machines are noisy), on variable-length token batches. Prints, on rank 0: the time per
window ratio (gradaccum / stock), the bytes DeepSpeed's collectives sent per window by kind
(its comms logger), and how far the stock loop's update is from the big batch's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import deepspeed.comm as ds_comm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import gradaccum  # noqa: E402

VOCAB, DIM = 2000, 256


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(VOCAB, DIM), torch.nn.Linear(DIM, DIM), torch.nn.Tanh(),
                               torch.nn.Linear(DIM, VOCAB))


def batches(rank: int, count: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(rank)
    out = []
    for _ in range(count):
        ids = torch.randint(1, VOCAB, (8, 64), generator=g)
        for row, length in zip(ids, torch.randint(4, 65, (8,), generator=g)):
            row[length:] = 0
        out.append(ids)
    return out


def loss_of(engine, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits = engine(ids[:, :-1])
    return F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], ignore_index=0), int((ids[:, 1:] != 0).sum())


def sent() -> dict[str, int]:
    return {op: sum(int(s) * int(v[0]) for s, v in sizes.items()) for op, sizes in ds_comm.comms_logger.comms_dict.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, default=2)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--windows", type=int, default=12)
    args = ap.parse_args()
    deepspeed.init_distributed("gloo")
    torch.set_num_threads(1)
    config = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": args.k,
              "zero_optimization": {"stage": args.stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "gradient_clipping": 1.0,
              "comms_logger": {"enabled": True, "prof_all": True}}
    # Two engines from the same weights: the accumulator owns its engine's boundary.
    engines = []
    for _ in range(2):
        net = model()
        engines.append(deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=1e-3),
                                            config=config)[:2])
    (engine, optimizer), (stock_engine, _) = engines
    rank = engine.global_rank
    data = batches(rank, args.k)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the notice that the config's accumulation steps are not used
        acc = gradaccum.Accumulator(engine, optimizer, steps=args.k)

    def stock() -> None:
        for ids in data:
            loss, _ = loss_of(stock_engine, ids)
            stock_engine.backward(loss)  # divided by k: the mean of means
            stock_engine.step()  # a no-op until the k-th micro-batch

    def exact() -> None:
        for window in acc.windows(data):
            for ids in window:
                loss, n = loss_of(engine, ids)
                window.backward(loss, num_items=n)
            window.step()

    times: dict[str, list[float]] = {"stock": [], "gradaccum": []}
    traffic: dict[str, dict[str, int]] = {}
    for i in range(args.windows + 2):
        for name, run in (("stock", stock), ("gradaccum", exact)) if i % 2 else (("gradaccum", exact), ("stock", stock)):
            torch.distributed.barrier()
            before = sent()
            t = time.perf_counter()
            run()
            elapsed = time.perf_counter() - t
            after = sent()
            if i >= 2:  # the first two rounds warm up
                times[name].append(elapsed)
                traffic[name] = {op: after[op] - before.get(op, 0) for op in after if after[op] != before.get(op, 0)}
    if rank == 0:
        s, e = statistics.median(times["stock"]), statistics.median(times["gradaccum"])
        print(f"ZeRO-{args.stage}, k={args.k}, 2 ranks: time per window stock {s * 1e3:.1f} ms, "
              f"gradaccum {e * 1e3:.1f} ms, ratio {e / s:.3f}")
        for name in ("stock", "gradaccum"):
            print(f"  {name}: bytes per window " + ", ".join(f"{op} {v:,}" for op, v in sorted(traffic[name].items())))


if __name__ == "__main__":
    main()
