"""A loss with two denominators: what exactness costs, per window and in memory.

Three loops over the same small transformer language model, the same micro-batches of
variable-length sequences (k = 4) and the same two-term loss (a token mean plus 0.3 x a
mean over sequences of their token means):

- ``one-term``: gradaccum with the summed loss weighed by tokens (one denominator; the
  baseline, inexact for this loss);
- ``terms``: gradaccum with ``terms=`` (counts read ahead, one backward per micro-batch);
- ``stores``: one gradient store per term, the alternative that needs no counts ahead: a
  backward per term (the first with ``retain_graph``) and a copy of the gradient aside,
  combined at the window's end once the totals are known.

Time: the loops alternate window by window in one process (this machine is noisy); the
median seconds per window and the ratio to ``one-term`` are printed. Memory: each loop runs
again alone in a fresh process and reports its peak resident memory (``ru_maxrss``) above
the same loop's start, and the bytes it holds between micro-batches beyond ``.grad``.

    python benchmarks/terms.py [--windows 12] [--dim 256]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import gradaccum

VOCAB, K, COEF = 2000, 4, 0.3


def model(dim: int) -> torch.nn.Module:
    torch.manual_seed(0)

    class LM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(VOCAB, dim)
            layer = torch.nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = torch.nn.Linear(dim, VOCAB)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)))

    return LM()


def batches(n: int) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        lengths = torch.randint(4, 96, (8,), generator=g)
        ids = torch.randint(0, VOCAB, (8, int(lengths.max())), generator=g)
        mask = (torch.arange(ids.shape[1]) < lengths[:, None]).float()
        out.append({"ids": ids, "mask": mask})
    return out


def terms(m: torch.nn.Module, b: dict) -> dict:
    logits = m(b["ids"])[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), b["ids"][:, 1:].reshape(-1), reduction="none")
    valid = b["mask"][:, 1:]
    ce = ce.reshape(valid.shape) * valid
    per_seq = ce.sum(1) / valid.sum(1)
    return {"lm": (ce.sum() / valid.sum(), int(valid.sum())), "seq": (COEF * per_seq.mean(), valid.shape[0])}


COUNTERS = {"lm": lambda b: int(b["mask"][:, 1:].sum()), "seq": lambda b: b["mask"].shape[0]}


class OneTerm:
    def __init__(self, m, data):
        self.m, self.opt = m, torch.optim.SGD(m.parameters(), lr=1e-3)
        self.acc = gradaccum.Accumulator(m, self.opt, steps=K)
        self.it = self.acc.windows(data)

    def window(self):
        w = next(self.it)
        for b in w:
            t = terms(self.m, b)
            w.backward(t["lm"][0] + t["seq"][0], num_items=t["lm"][1])
        w.step()


class Terms(OneTerm):
    def __init__(self, m, data):
        self.m, self.opt = m, torch.optim.SGD(m.parameters(), lr=1e-3)
        self.acc = gradaccum.Accumulator(m, self.opt, steps=K, terms=COUNTERS)
        self.it = self.acc.windows(data)

    def window(self):
        w = next(self.it)
        for b in w:
            w.backward(terms(self.m, b))
        w.step()


class Stores:
    """One gradient store per term: exact without counts ahead, at a backward per term."""

    def __init__(self, m, data):
        self.m, self.opt, self.data, self.i = m, torch.optim.SGD(m.parameters(), lr=1e-3), data, 0
        self.params = list(m.parameters())
        self.stores = {name: [torch.zeros_like(p) for p in self.params] for name in COUNTERS}

    def window(self):
        totals = dict.fromkeys(COUNTERS, 0.0)
        for b in self.data[self.i:self.i + K]:
            t = terms(self.m, b)
            for j, (name, (mean, n)) in enumerate(t.items()):
                (mean * n).backward(retain_graph=j < len(t) - 1)
                for s, p in zip(self.stores[name], self.params):
                    s.add_(p.grad)
                    p.grad = None
                totals[name] += n
        self.i += K
        for j, p in enumerate(self.params):
            p.grad = sum(self.stores[name][j] / totals[name] for name in COUNTERS)
        self.opt.step()
        for store in self.stores.values():
            for s in store:
                s.zero_()
        self.opt.zero_grad(set_to_none=True)

    def held_bytes(self) -> int:
        return sum(s.numel() * s.element_size() for store in self.stores.values() for s in store)


LOOPS = {"one-term": OneTerm, "terms": Terms, "stores": Stores}


def peak(name: str, windows: int, dim: int) -> None:
    """Run ``name`` alone; print the process's peak resident memory and what the loop holds
    beside ``.grad`` (MiB). With ``windows=0`` the peak is that of the set-up alone."""
    data = batches(K * max(windows, 1))
    m = model(dim)
    loop = LOOPS[name](m, data)
    for _ in range(windows):
        loop.window()
    held = loop.held_bytes() if hasattr(loop, "held_bytes") else 0
    print(f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f} {held / 2**20:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.peak:
        peak(args.peak, args.windows, args.dim)
        return
    # First, while this process is small: a child's peak RSS starts from its parent's (fork).
    def rss(name: str, windows: int) -> list[float]:
        out = subprocess.run([sys.executable, __file__, "--peak", name, "--windows", str(windows), "--dim",
                              str(args.dim)], capture_output=True, text=True, check=True).stdout.split()
        return [float(x) for x in out]

    setup = rss("one-term", 0)[0]
    memory = {name: rss(name, 4) for name in LOOPS}
    data = batches(K * (args.windows + 2))
    loops = {name: cls(model(args.dim), data) for name, cls in LOOPS.items()}
    times: dict[str, list[float]] = {name: [] for name in LOOPS}
    for w in range(args.windows + 2):
        for name, loop in loops.items():
            t0 = time.perf_counter()
            loop.window()
            if w >= 2:  # the first windows warm up allocators and caches
                times[name].append(time.perf_counter() - t0)
    params = sum(p.numel() for p in model(args.dim).parameters())
    print(f"{params / 1e6:.2f}M parameters, k={K}, {args.windows} windows each, alternated")
    base = statistics.median(times["one-term"])

    for name in LOOPS:
        peak_mib, held = memory[name]
        med = statistics.median(times[name])
        print(f"{name:9s} {med * 1e3:8.1f} ms/window  ratio {med / base:.3f}  peak RSS above set-up "
              f"{peak_mib - setup:6.1f} MiB  held beside .grad {held:.1f} MiB")


if __name__ == "__main__":
    main()
