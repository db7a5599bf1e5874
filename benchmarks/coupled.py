"""Coupled losses: the memory, time and effect of exact in-batch negatives (window.encode).

The MiniLM bi-encoder of ``gradaccum train --task retrieval`` (mean pooling, review -> its
condition, InfoNCE with in-batch negatives, duplicates of a condition masked), on CPU.

``cost``: at an effective batch of B=256 with micro-batches of m=16 (max length 128):
  - peak memory, each configuration in a fresh process (resident-set high-water mark above
    the resident set after loading; glibc returns blocks of 128 KiB and more when freed):
    cached accumulation (k=16) against training one micro-batch of 16 alone, and one batch
    of 256 for scale. Target: cached within 15% of the micro-batch alone.
  - time per optimizer step, alternated in one process: cached accumulation against one
    batch of 256 (the same gradient) and against plain accumulation (k micro-batches with
    negatives only inside each). Target: cached <= 1.4x the batch of 256.

``quality``: three full retrieval runs at the same micro-batch (8): cached to an effective
batch of 64, plain accumulation to 64 (negatives within each micro-batch of 8), and plain
batches of 8; writes a table and ``docs/coupled-quality.png``.

    python benchmarks/coupled.py cost [--repeats 3]
    python benchmarks/coupled.py quality [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, torch
torch.set_num_threads(int(sys.argv[4]))
sys.path.insert(0, sys.argv[5])
from coupled import setup, step
from gradaccum.recipes.plan import baseline, _rss_kib
mode, m, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model, acc, batches = setup(m, k, windows=2)
base = baseline(torch.device("cpu"))
for w in range(2):
    step(mode, model, acc, batches[w * k:(w + 1) * k])
print(json.dumps({"peak": _rss_kib("VmHWM") * 1024 - base}))
"""


def setup(m: int, k: int, windows: int, max_length: int = 128, seed: int = 0):
    """The bi-encoder, its accumulator (k micro-batches per step) and windows * k micro-batches of m."""
    import torch
    import transformers

    import gradaccum
    from gradaccum.recipes import assets
    from gradaccum.recipes.retrieval import BiEncoder, PairBatcher

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(seed)
    path = assets.default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = BiEncoder(transformers.AutoModel.from_pretrained(path))
    model.train()
    rows = assets.drug_reviews("train")
    conditions = sorted({r["condition"] for r in rows})
    cid = {c: i for i, c in enumerate(conditions)}
    ids = tok([r["review"] for r in rows], truncation=True, max_length=max_length)["input_ids"]
    batcher = PairBatcher(ids, [cid[r["condition"]] for r in rows], tok(conditions)["input_ids"], tok.pad_token_id)
    order = batcher.epoch_order(seed, 0)
    batches = [batcher.collate(order[(i * m) % len(order):(i * m) % len(order) + m]) for i in range(windows * k)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    return model, gradaccum.Accumulator(model, opt, steps=k), batches


def step(mode: str, model, acc, window_batches) -> float:
    """One optimizer step: "cached" (encode + backward_encoded) or "plain" (negatives per micro-batch)."""
    import torch

    from gradaccum.recipes.retrieval import in_batch_loss

    t0 = time.perf_counter()
    for window in acc.windows(window_batches):
        if mode == "cached":
            reps, conds = [], []
            for b in window:
                b = dict(b)
                conds.append(b.pop("conditions"))
                reps.append(window.encode(model, b))
            window.backward_encoded(in_batch_loss(torch.cat([r[0] for r in reps]), torch.cat([r[1] for r in reps]), torch.cat(conds)))
        else:
            for b in window:
                b = dict(b)
                c = b.pop("conditions")
                q, d = model(b)
                window.backward(in_batch_loss(q, d, c), num_items=len(c))
        window.step()
    return time.perf_counter() - t0


def peak(mode: str, m: int, k: int, threads: int) -> int:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(m), str(k), str(threads), str(Path(__file__).parent)],
                         capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def cost(args: argparse.Namespace) -> None:
    import torch

    B, m = args.effective, args.micro
    k = B // m
    torch.set_num_threads(args.threads)
    alone, cached, whole = peak("plain", m, 1, args.threads), peak("cached", m, k, args.threads), peak("plain", B, 1, args.threads)
    print(f"MiniLM bi-encoder, CPU ({args.threads} threads), max length 128, effective batch {B}, micro-batch {m}")
    print(f"peak memory above the loaded model: micro-batch {m} alone {alone / 2**20:.0f} MiB, "
          f"cached {m} x {k} {cached / 2**20:.0f} MiB, one batch of {B} {whole / 2**20:.0f} MiB")
    print(f"  cached / micro-batch alone = {cached / alone:.3f}   (target <= 1.15); cached / batch of {B} = {cached / whole:.3f}")
    model, acc, batches = setup(m, k, windows=1)
    big_model, big_acc, _ = setup(B, 1, windows=0)
    big_batch = [_merge(batches)]
    times: dict[str, list[float]] = {"cached": [], "big": [], "plain": []}
    step("cached", model, acc, batches)  # warm-up
    step("plain", big_model, big_acc, big_batch)
    for _ in range(args.repeats):  # alternated: a slow moment of the machine hits all three
        times["big"].append(step("plain", big_model, big_acc, big_batch))
        times["cached"].append(step("cached", model, acc, batches))
        times["plain"].append(step("plain", model, acc, batches))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"seconds per optimizer step (median of {args.repeats}): cached {med['cached']:.2f}, one batch of {B} "
          f"{med['big']:.2f}, plain accumulation {med['plain']:.2f}")
    print(f"  cached / one batch = {med['cached'] / med['big']:.3f}   (target <= 1.4); cached / plain accumulation = "
          f"{med['cached'] / med['plain']:.3f}")


def _merge(batches: list[dict]) -> dict:
    import torch

    from gradaccum.recipes.retrieval import _pad

    out = {}
    for key, mask in (("input_ids", "attention_mask"), ("doc_ids", "doc_mask")):
        seqs = [row[msk.bool()].tolist() for b in batches for row, msk in zip(b[key], b[mask])]
        out[key], out[mask] = _pad(seqs, 0)
    out["conditions"] = torch.cat([b["conditions"] for b in batches])
    return out


def quality(args: argparse.Namespace) -> None:
    from gradaccum.recipes.config import TrainConfig
    from gradaccum.recipes.retrieval import run

    settings = [
        ("cached, effective batch 64 (exact)", dict(effective_batch=64, micro_batch=8, negatives="window")),
        ("plain accumulation to 64 (negatives within each 8)", dict(effective_batch=64, micro_batch=8, negatives="micro-batch")),
        ("plain batches of 8", dict(effective_batch=8, micro_batch=8, negatives="window")),
    ]
    rows = []
    for name, kw in settings:
        out = Path(args.out) / name.split(",")[0].split(" ")[0] / str(kw["effective_batch"])
        cfg = TrainConfig(task="retrieval", epochs=args.epochs, lr=args.lr, save_every=0, out=str(out), **kw)
        t0 = time.perf_counter()
        s = run(cfg, log=lambda _m: None)
        rows.append((name, s, time.perf_counter() - t0))
        print(f"{name}: accuracy@1 {s['eval']['accuracy@1']:.3f}, MRR {s['eval']['mrr']:.3f}, {s['train_seconds']:.0f} s", flush=True)
    base = rows[0][1]["baseline"]
    print(f"\n| setting | accuracy@1 | MRR | training s |\n|---|---|---|---|\n| untuned model (zero-shot) | {base['accuracy@1']:.3f} | {base['mrr']:.3f} | |")
    for name, s, _ in rows:
        print(f"| {name} | {s['eval']['accuracy@1']:.3f} | {s['eval']['mrr']:.3f} | {s['train_seconds']:.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s, _ in rows:
        evals = [{"epoch": 0, **base}] + s["evals"]
        ax.plot([e["epoch"] for e in evals], [e["mrr"] for e in evals], "o-", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("MRR over all training conditions")
    ax.set_title("MiniLM bi-encoder, drug reviews -> condition, micro-batch 8")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png = Path(__file__).resolve().parent.parent / "docs" / "coupled-quality.png"
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    c = sub.add_parser("cost")
    c.add_argument("--effective", type=int, default=256)
    c.add_argument("--micro", type=int, default=16)
    c.add_argument("--repeats", type=int, default=3)
    c.add_argument("--threads", type=int, default=2)
    q = sub.add_parser("quality")
    q.add_argument("--epochs", type=int, default=2)
    q.add_argument("--lr", type=float, default=5e-5)
    q.add_argument("--out", default="runs/coupled-quality")
    args = ap.parse_args()
    cost(args) if args.what == "cost" else quality(args)


if __name__ == "__main__":
    main()
