"""Wall time per optimizer step: gradaccum against the plain hand-written loop.

Same model, same in-memory micro-batches, runs alternated (this machine is noisy); prints
the median seconds per step of each and their ratio. Target: ratio <= 1.03 on the MLP.

    python benchmarks/overhead.py [--repeats 21] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import gradaccum


def mlp_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    data = [(torch.randn(32, 784), torch.randint(0, 10, (32,))) for _ in range(64)]
    return model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda b: len(b[1])


def transformer_case():
    torch.manual_seed(0)
    vocab, dim = 1000, 128

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, dim)
            layer = torch.nn.TransformerEncoderLayer(dim, 4, 256, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2)
            self.head = torch.nn.Linear(dim, vocab)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)))

    data = [torch.randint(0, vocab, (8, 64)) for _ in range(64)]

    def loss(m, ids):
        logits = m(ids)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return Small(), data, loss, lambda ids: ids[:, 1:].numel()


def plain_loop(model, opt, data, loss_fn, count, k, steps):
    # The seeds' loop: loss / k, backward, step every k micro-batches.
    t0 = time.perf_counter()
    for s in range(steps):
        for j in range(k):
            loss = loss_fn(model, data[(s * k + j) % len(data)]) / k
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def gradaccum_loop(model, opt, data, loss_fn, count, k, steps):
    acc = gradaccum.Accumulator(model, opt, steps=k)
    stream = [data[i % len(data)] for i in range(steps * k)]
    t0 = time.perf_counter()
    for window in acc.windows(stream):
        for batch in window:
            window.backward(loss_fn(model, batch), num_items=count(batch))
        window.step()
    return (time.perf_counter() - t0) / steps


def measure(name, case, k, steps, repeats):
    model, data, loss_fn, count = case()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    runs = {"plain": [], "gradaccum": []}
    fns = {"plain": plain_loop, "gradaccum": gradaccum_loop}
    for fn in fns.values():  # warm-up
        fn(model, opt, data, loss_fn, count, k, 3)
    for r in range(repeats):
        order = ["plain", "gradaccum"] if r % 2 == 0 else ["gradaccum", "plain"]
        for key in order:
            runs[key].append(fns[key](model, opt, data, loss_fn, count, k, steps))
    plain, ours = statistics.median(runs["plain"]), statistics.median(runs["gradaccum"])
    print(f"{name:<34} plain {plain * 1e3:8.3f} ms/step   gradaccum {ours * 1e3:8.3f} ms/step   ratio {ours / plain:.3f}")
    return ours / plain


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads; 1 keeps a 2-core machine's noise down")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    measure("MLP 784-256-10, micro-batch 32, k=8", mlp_case, 8, args.steps, args.repeats)
    measure("transformer 2x128, 8x64 tokens, k=4", transformer_case, 4, max(5, args.steps // 3), max(7, args.repeats // 2))


if __name__ == "__main__":
    main()
