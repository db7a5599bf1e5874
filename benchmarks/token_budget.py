"""Token-budget windows against fixed micro-batches: padding and time per epoch.

The MiniLM classifier on the 600 training drug reviews, CPU, windows of B=32 examples.
Fixed: micro-batches of m=8 in shuffled order (each padded to its own longest review).
Token budget: each window sorted by length and cut at m x max_length padded tokens, so the
largest micro-batch either can form holds the same number of tokens: the same peak memory.
Both give the same update (tests/engine/test_token_budget.py); only the time differs. Epochs of
the two are alternated in one process, so a slow moment of the machine hits both.

    python benchmarks/token_budget.py [--max-length 256] [--micro 8] [--window 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def fixed_plan(order: list[int], window: int, m: int) -> list[list[list[int]]]:
    return [[order[w + j: w + j + m] for j in range(0, min(window, len(order) - w), m)] for w in range(0, len(order), window)]


def padding(plan, lengths) -> tuple[int, int]:
    padded = sum(len(mb) * max(lengths[i] for i in mb) for w in plan for mb in w)
    return padded, sum(lengths[i] for w in plan for mb in w for i in mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--micro", type=int, default=8)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import transformers

    import gradaccum
    from gradaccum.data import TokenBudgetSampler
    from gradaccum.recipes import assets

    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = assets.default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    rows = assets.drug_reviews("train")
    labels = {"negative": 0, "neutral": 1, "positive": 2}
    texts = [r["review"] for r in rows]
    y = [labels[r["label"]] for r in rows]
    for length in sorted({128, args.max_length}):
        ids = tok(texts, truncation=True, max_length=length)["input_ids"]
        lengths = [len(x) for x in ids]
        sampler = TokenBudgetSampler(lengths, window=args.window, max_tokens=args.micro * length, seed=0)
        pf, rf = padding(fixed_plan(torch.randperm(len(ids), generator=torch.Generator().manual_seed(0)).tolist(), args.window, args.micro), lengths)
        pb, rb = padding(sampler.windows(), lengths)
        print(f"max length {length}: padded / real tokens: fixed micro-batches of {args.micro} {pf / rf:.3f}, "
              f"token budget {args.micro * length} {pb / rb:.3f}")
    ids = tok(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(x) for x in ids]
    sampler = TokenBudgetSampler(lengths, window=args.window, max_tokens=args.micro * args.max_length, seed=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5)

    def collate(index: list[int]) -> dict:
        width = max(lengths[i] for i in index)
        input_ids = torch.full((len(index), width), tok.pad_token_id)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        for row, i in enumerate(index):
            input_ids[row, : lengths[i]] = torch.tensor(ids[i])
            mask[row, : lengths[i]] = 1
        return {"input_ids": input_ids, "attention_mask": mask, "labels": torch.tensor([y[i] for i in index])}

    def epoch(kind: str, e: int) -> float:
        if kind == "budget":
            sampler.set_epoch(e)
            loader = torch.utils.data.DataLoader(range(len(ids)), batch_sampler=sampler, collate_fn=collate)
            acc = gradaccum.Accumulator(model, opt, steps=sampler)
        else:
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(e)).tolist()
            loader = [collate(mb) for w in fixed_plan(order, args.window, args.micro) for mb in w]
            acc = gradaccum.Accumulator(model, opt, steps=-(-args.window // args.micro))
        t0 = time.perf_counter()
        for window in acc.windows(loader):
            for b in window:
                window.backward(model(**b).loss, num_items=len(b["labels"]))
            window.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {"fixed": [], "budget": []}
    for r in range(args.repeats):
        for kind in ("fixed", "budget") if r % 2 == 0 else ("budget", "fixed"):
            times[kind].append(epoch(kind, r))
            print(f"  epoch {r}: {kind} {times[kind][-1]:.1f} s", flush=True)
    f, b = statistics.median(times["fixed"]), statistics.median(times["budget"])
    print(f"seconds per epoch at max length {args.max_length}: fixed {f:.1f}, token budget {b:.1f}; "
          f"budget / fixed = {b / f:.3f} (target <= 0.80)")


if __name__ == "__main__":
    main()
