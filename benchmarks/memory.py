"""Peak memory: an effective batch B as one batch, and as k micro-batches of m (k = B/m).

The MiniLM classifier on CPU, the longest drug reviews (128 tokens), AdamW. Each
configuration runs in a fresh process and reports its peak resident set above the resident
set after loading the model (``VmHWM - VmRSS``, see ``gradaccum.recipes.plan``). For each
m it compares the accumulated run (k micro-batches, then the step) with the same micro-batch
trained without accumulation (a step after every micro-batch, as many micro-batches).
Target: within 10%. The accumulated run is measured twice: gradients held densely, and
with ``compact_embedding_grads=True`` (the word-embedding gradient held as its touched rows
between micro-batches, as ``gradaccum train`` does).

glibc keeps freed memory mapped (its mmap threshold grows after large frees), so by
default the resident set's high-water mark partly measures the allocator's history. With
``--malloc mmap`` the children run with ``MALLOC_MMAP_THRESHOLD_=131072``: blocks of 128 KiB
and more are returned when freed, and the high-water mark follows the tensors alive.

    python benchmarks/memory.py [--effective 32] [--micro 16 8 4] [--malloc default|mmap]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from gradaccum import Accumulator
from gradaccum.recipes.config import TrainConfig
from gradaccum.recipes.data import Batcher, load_splits
from gradaccum.recipes.model import build as _build
from gradaccum.recipes.plan import baseline, _rss_kib
m, k, windows, compact = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
cfg = TrainConfig(micro_batch=m, effective_batch=m * k)
splits = load_splits(cfg)
tok, model = _build(cfg, 3, splits.labels)
model.train()
ids = tok(splits.train_texts, truncation=True, max_length=128)["input_ids"]
longest = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
batcher = Batcher(ids, splits.train_labels, tok.pad_token_id, "sentiment")
batches = []
for i in range(windows * k):
    b = batcher.collate(longest[i * m:(i + 1) * m]); b.pop("num_items"); batches.append(b)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
base = baseline(torch.device("cpu"))
acc = Accumulator(model, opt, steps=k, compact_embedding_grads=compact)
for window in acc.windows(batches):
    for b in window:
        window.backward(model(**b).loss, num_items=b["labels"].shape[0])
    window.step()
print(json.dumps({"peak": _rss_kib("VmHWM") * 1024 - base}))
"""


def peak(m: int, k: int, windows: int, compact: bool = False, malloc: str = "default") -> int:
    env = dict(os.environ)
    if malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    out = subprocess.run([sys.executable, "-c", CHILD, str(m), str(k), str(windows), str(int(compact))],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effective", type=int, default=32)
    ap.add_argument("--micro", type=int, nargs="+", default=[16, 8, 4])
    ap.add_argument("--malloc", choices=["default", "mmap"], default="mmap")
    args = ap.parse_args()
    B, mode = args.effective, args.malloc
    whole = peak(B, 1, 2, malloc=mode)
    print(f"MiniLM classifier, CPU, 128 tokens, malloc {mode}, effective batch {B}: one batch of {B}: peak {whole / 2**20:.1f} MiB")
    print(f"{'m':>4} {'k':>4} {'dense MiB':>10} {'compact MiB':>12} {'no accum MiB':>13} {'dense ratio':>12} {'compact ratio':>14} {'vs one batch':>13}")
    for m in args.micro:
        k = B // m
        # The same number of forward/backward passes on both sides: 2 windows of k, or 2k plain steps.
        alone = peak(m, 1, 2 * k, malloc=mode)
        dense, compact = peak(m, k, 2, malloc=mode), peak(m, k, 2, compact=True, malloc=mode)
        print(f"{m:>4} {k:>4} {dense / 2**20:>10.1f} {compact / 2**20:>12.1f} {alone / 2**20:>13.1f} "
              f"{dense / alone:>12.3f} {compact / alone:>14.3f} {compact / whole:>13.3f}")


if __name__ == "__main__":
    main()
