"""A router load-balancing loss under accumulation: what each way of making it exact costs.

A small mixture-of-experts language model (top-2 of 8 experts in each of 4 layers, width
256; per-token, no attention), micro-batches of 8 sequences of 4-96 tokens, the loss a
token mean plus 0.01 x the Switch Transformer load-balancing loss. The loops:

- ``plain``: each micro-batch's loss with its own router loss, divided by k (the usual
  loop, and what the stock Trainer does; the baseline for time and memory);
- ``counted``: gradaccum's default: a forward without gradients over the window's
  micro-batches when it opens counts the assignments, then one backward per micro-batch
  with its exact share (``RouterLoss`` term);
- ``stores``: one gradient store per expert: each micro-batch's probability sum of each
  expert differentiated on its own (8 extra backwards), combined with the window's
  assignments at its end;
- ``previous``: the previous window's assignment fractions in place of this window's (one
  backward, no counting; not exact: its error is measured against ``counted``).

Time: the loops alternate window by window in one process (this machine is noisy); median
seconds per window and the ratio to ``plain``. Memory: each loop runs again alone in a fresh
process; its peak resident memory above the same loop's start. Error: each loop's window
gradient against ``counted`` at the same weights (relative).

    python benchmarks/moe.py [--windows 10] [--k 4,8]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import gradaccum
from gradaccum.moe import RouterLoss, balance_loss, probabilities, routing

VOCAB, DIM, EXPERTS, TOP_K, LAYERS, COEF = 1000, 256, 8, 2, 4, 0.01


class MoE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(VOCAB, DIM)
        self.routers = torch.nn.ModuleList(torch.nn.Linear(DIM, EXPERTS) for _ in range(LAYERS))
        self.experts = torch.nn.ModuleList(torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(DIM, 2 * DIM), torch.nn.GELU(), torch.nn.Linear(2 * DIM, DIM))
            for _ in range(EXPERTS)) for _ in range(LAYERS))
        self.head = torch.nn.Linear(DIM, VOCAB)

    def forward(self, ids):
        h = self.emb(ids).reshape(-1, DIM)
        router_logits = []
        for router, experts in zip(self.routers, self.experts):
            logits = router(h)
            router_logits.append(logits)
            weights, chosen = torch.topk(torch.softmax(logits, -1), TOP_K, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e, expert in enumerate(experts):
                rows = (chosen == e).any(-1).nonzero().squeeze(-1)
                if rows.numel():
                    w = (weights[rows] * (chosen[rows] == e)).sum(-1, keepdim=True)
                    out = out.index_add(0, rows, w * expert(h[rows]))
            h = h + out
        return self.head(h).reshape(*ids.shape, -1), tuple(router_logits)


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        lengths = torch.randint(4, 97, (8,), generator=g)
        ids = torch.randint(0, VOCAB, (8, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()
        out.append({"ids": ids, "mask": mask})
    return out


def lm_mean(m, b):
    logits, router_logits = m(b["ids"])
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), b["ids"][:, 1:].reshape(-1), reduction="none")
    valid = b["mask"][:, 1:].reshape(-1).float()
    return (ce * valid).sum() / valid.sum(), valid.sum(), router_logits


class Plain:
    def __init__(self, m, data, k):
        self.m, self.data, self.k, self.i = m, data, k, 0

    def window(self):
        for _ in range(self.k):
            b = self.data[self.i % len(self.data)]
            self.i += 1
            lm, _, logits = lm_mean(self.m, b)
            a, r = routing(logits, TOP_K, b["mask"])
            aux = balance_loss(probabilities(logits, b["mask"]), a, r, EXPERTS)
            ((lm + COEF * aux) / self.k).backward()
        grads = [p.grad.clone() for p in self.m.parameters()]
        self.m.zero_grad(set_to_none=True)
        return grads


class Counted:
    def __init__(self, m, data, k):
        self.m = m
        self.opt = torch.optim.SGD(m.parameters(), lr=0.0)
        stream = (data[i % len(data)] for i in range(10**9))
        router = RouterLoss(lambda b: (m(b["ids"])[1], b["mask"]), num_experts=EXPERTS, top_k=TOP_K, coef=COEF)
        acc = gradaccum.Accumulator(m, self.opt, steps=k, terms={"lm": lambda b: float(b["mask"][:, 1:].sum()),
                                                                 "router": router})
        self.windows = acc.windows(stream)

    def window(self):
        window = next(self.windows)
        for b in window:
            lm, n, logits = lm_mean(self.m, b)
            window.backward({"lm": (lm, n), "router": (logits, b["mask"])})
        report = window.finish()
        grads = [p.grad.clone() for p in self.m.parameters()]
        window.close()
        return grads if not report.skipped else grads


class Stores:
    """One store per expert: d(sum of expert e's probabilities)/d(params), kept apart."""

    def __init__(self, m, data, k):
        self.m, self.data, self.k, self.i = m, data, k, 0
        self.params = [p for p in m.parameters()]
        self.stores = None

    def window(self):
        items = [float(self.data[(self.i + j) % len(self.data)]["mask"][:, 1:].sum()) for j in range(self.k)]
        total = sum(items)
        stores = [[torch.zeros_like(p) for p in self.params] for _ in range(EXPERTS)]
        assigned, rows = torch.zeros(EXPERTS, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for _j in range(self.k):
            b = self.data[self.i % len(self.data)]
            self.i += 1
            lm, n, logits = lm_mean(self.m, b)
            a, r = routing(logits, TOP_K, b["mask"])
            assigned += a
            rows += r
            probs = probabilities(logits, b["mask"])
            for e in range(EXPERTS):
                gs = torch.autograd.grad(probs[e], self.params, retain_graph=True, allow_unused=True)
                for s, g in zip(stores[e], gs):
                    if g is not None:
                        s.add_(g)
            (lm * (float(n) / total)).backward()
        factor = COEF * EXPERTS * assigned / rows ** 2
        for e in range(EXPERTS):
            for p, s in zip(self.params, stores[e]):
                p.grad.add_(s, alpha=float(factor[e]))
        self.stores = stores
        grads = [p.grad.clone() for p in self.params]
        self.m.zero_grad(set_to_none=True)
        return grads


class Previous:
    """Last window's assignment fractions for this window's surrogate: one backward, inexact."""

    def __init__(self, m, data, k):
        self.m, self.data, self.k, self.i = m, data, k, 0
        self.fraction = torch.full((EXPERTS,), TOP_K / EXPERTS, dtype=torch.float64)

    def window(self):
        items = [float(self.data[(self.i + j) % len(self.data)]["mask"][:, 1:].sum()) for j in range(self.k)]
        rows_now = sum(float(self.data[(self.i + j) % len(self.data)]["mask"].sum()) * LAYERS for j in range(self.k))
        assigned = torch.zeros(EXPERTS, dtype=torch.float64)
        for _j in range(self.k):
            b = self.data[self.i % len(self.data)]
            self.i += 1
            lm, n, logits = lm_mean(self.m, b)
            assigned += routing(logits, TOP_K, b["mask"])[0]
            share = balance_loss(probabilities(logits, b["mask"]), self.fraction * rows_now, rows_now, EXPERTS)
            (lm * (float(n) / sum(items)) + COEF * share).backward()
        self.fraction = assigned / rows_now
        grads = [p.grad.clone() for p in self.m.parameters()]
        self.m.zero_grad(set_to_none=True)
        return grads


LOOPS = {"plain": Plain, "counted": Counted, "stores": Stores, "previous": Previous}


def rel(a, b) -> float:
    num = sum(float((x.double() - y.double()).pow(2).sum()) for x, y in zip(a, b))
    return (num / sum(float(y.double().pow(2).sum()) for y in b)) ** 0.5


def high_water_kib() -> int:
    # ru_maxrss carries the parent's peak across fork and exec on Linux, so a child started
    # after a large loop would report nothing above it; VmHWM belongs to this process alone.
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1])
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak(name: str, k: int, windows: int) -> None:
    torch.set_num_threads(1)
    m, data = MoE(), batches(16)
    loop = LOOPS[name](m, data, k)
    start = high_water_kib()
    for _ in range(windows):
        loop.window()
    print((high_water_kib() - start) / 1024)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=10)
    ap.add_argument("--k", default="4,8")
    ap.add_argument("--peak", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.windows < 2:
        ap.error("--windows must be at least 2: the first window has no previous one to compare")
    if args.peak:
        peak(args.peak[0], int(args.peak[1]), 3)
        return
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; MoE {LAYERS} layers x {EXPERTS} experts, top-{TOP_K}, width {DIM}")
    for k in [int(x) for x in args.k.split(",")]:
        memory = {name: float(subprocess.run([sys.executable, __file__, "--peak", name, str(k)], capture_output=True,
                                             text=True, check=True).stdout.split()[-1]) for name in LOOPS}
        base = MoE()
        data = batches(16)
        loops = {name: cls(copy.deepcopy(base), data, k) for name, cls in LOOPS.items()}
        times: dict[str, list[float]] = {name: [] for name in LOOPS}
        errors: dict[str, list[float]] = {name: [] for name in LOOPS}
        for w in range(args.windows):
            grads = {}
            order = list(LOOPS) if w % 2 == 0 else list(LOOPS)[::-1]
            for name in order:
                t0 = time.perf_counter()
                grads[name] = loops[name].window()
                times[name].append(time.perf_counter() - t0)
            for name in LOOPS:
                errors[name].append(rel(grads[name], grads["counted"]))
        plain = statistics.median(times["plain"])
        print(f"k = {k}:")
        for name in LOOPS:
            t = statistics.median(times[name])
            print(f"  {name:9s} {t * 1e3:8.1f} ms/window  ratio {t / plain:.3f}  peak RSS +{memory[name]:.0f} MiB  "
                  f"error vs counted: median {statistics.median(errors[name][1:]):.2e}, max {max(errors[name][1:]):.2e}")


if __name__ == "__main__":
    main()
