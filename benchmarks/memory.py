"""Peak memory: an effective batch B as one batch, and as k micro-batches of m (k = B/m).

The MiniLM classifier on CPU, the longest drug reviews (128 tokens), AdamW. Each
configuration runs in a fresh process and reports its peak resident set above the resident
set after loading the model (``VmHWM - VmRSS``, see ``gradaccum.recipes.plan``). For each
m it compares the accumulated run (k micro-batches, then the step) with the same micro-batch
trained without accumulation (a step after every micro-batch, as many micro-batches).
Target: within 10%.

    python benchmarks/memory.py [--effective 32] [--micro 16 8 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, torch
torch.set_num_threads(1)
from gradaccum import Accumulator
from gradaccum.recipes.config import TrainConfig
from gradaccum.recipes.data import Batcher, load_splits
from gradaccum.recipes.train import _build
from gradaccum.recipes.plan import baseline, _rss_kib
m, k, windows = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
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
acc = Accumulator(model, opt, steps=k)
for window in acc.windows(batches):
    for b in window:
        window.backward(model(**b).loss, num_items=b["labels"].shape[0])
    window.step()
print(json.dumps({"peak": _rss_kib("VmHWM") * 1024 - base}))
"""


def peak(m: int, k: int, windows: int) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, str(m), str(k), str(windows)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--effective", type=int, default=32)
    ap.add_argument("--micro", type=int, nargs="+", default=[16, 8, 4])
    args = ap.parse_args()
    B = args.effective
    whole = peak(B, 1, 2)
    print(f"MiniLM classifier, CPU, 128 tokens, effective batch {B}: one batch of {B}: peak {whole / 2**20:.1f} MiB")
    print(f"{'m':>4} {'k':>4} {'accumulated MiB':>16} {'no accumulation MiB':>20} {'ratio':>7} {'vs one batch':>13}")
    for m in args.micro:
        k = B // m
        # The same number of forward/backward passes on both sides: 2 windows of k, or 2k plain steps.
        acc, alone = peak(m, k, 2), peak(m, 1, 2 * k)
        print(f"{m:>4} {k:>4} {acc / 2**20:>16.1f} {alone / 2**20:>20.1f} {acc / alone:>7.3f} {acc / whole:>13.3f}")


if __name__ == "__main__":
    main()
