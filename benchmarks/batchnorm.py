"""BatchNorm under accumulation on real images: scikit-learn's bundled digits (8x8).

A small CNN, effective batch 64 as 16 micro-batches of 4, Adam, the same seed and data
order for every variant; test accuracy (eval mode, running statistics) over several seeds:

- BatchNorm, big batch of 64 (the reference),
- BatchNorm, accumulated naively (each micro-batch of 4 normalizes and updates statistics),
- WindowBatchNorm (gradaccum.nn.convert_batchnorm(to="window")), accumulated,
- GroupNorm (convert_batchnorm(to="groupnorm")), accumulated.

    pip install scikit-learn && python benchmarks/batchnorm.py [--seeds 3] [--epochs 15]
"""

from __future__ import annotations

import argparse
import statistics
import warnings

import torch
import torch.nn.functional as F

import gradaccum
from gradaccum.nn import convert_batchnorm


def cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(128, 10),
    )


def load():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


def train(variant, seed, data, epochs, micro, k):
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = cnn()
    if variant == "window":
        convert_batchnorm(model, to="window")
    elif variant == "groupnorm":
        convert_batchnorm(model, to="groupnorm")
    m, steps = (micro * k, 1) if variant == "big batch" else (micro, k)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the naive variant is accumulated with BatchNorm on purpose
        acc = gradaccum.Accumulator(model, opt, steps=steps)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(ytr), generator=g)
        batches = [(xtr[order[i:i + m]], ytr[order[i:i + m]]) for i in range(0, len(order), m)]
        model.train()
        for window in acc.windows(batches):
            for xb, yb in window:
                window.backward(F.cross_entropy(model(xb), yb), num_items=len(yb))
            window.step()
    model.eval()
    with torch.no_grad():
        return (model(xte).argmax(-1) == yte).float().mean().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--k", type=int, default=16)
    args = ap.parse_args()
    data = load()
    print(f"digits: {len(data[1])} train / {len(data[3])} test images; effective batch {args.micro * args.k} "
          f"= {args.k} x {args.micro}; {args.epochs} epochs; {args.seeds} seeds")
    for variant, label in [("big batch", "BatchNorm, one batch of 64"), ("naive", "BatchNorm, naive accumulation"),
                           ("window", "WindowBatchNorm, accumulated"), ("groupnorm", "GroupNorm, accumulated")]:
        accs = [train(variant, s, data, args.epochs, args.micro, args.k) for s in range(args.seeds)]
        print(f"{label:<32} test accuracy {statistics.mean(accs):.4f}  (seeds: {', '.join(f'{a:.4f}' for a in accs)})")


if __name__ == "__main__":
    main()
