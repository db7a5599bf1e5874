"""A real loss with two denominators: how far one weight per micro-batch is from the big batch.

The pretrained MiniLM encoder on the UCI drug reviews, trained on two terms at once: the
review's sentiment (cross-entropy on the [CLS] state, a mean over reviews) plus 0.5 x a
masked-language-model term over 15% of each review's tokens (a mean over masked tokens,
predicted through the tied word embeddings). Windows of k = 4 micro-batches of 4 reviews,
padded to their own longest review (at most 128 tokens). For each window the gradient
handed to the optimizer is compared with the window's big batch computed in float64 (all
16 reviews as one batch, the same masked positions):

- ``terms``: ``Accumulator(terms=...)``, each term weighed by its own items;
- ``one weight (reviews)`` / ``one weight (tokens)``: the summed loss with ``num_items`` the
  reviews, or the masked tokens (what a one-denominator API allows);
- ``divide by k``: the common loop, each micro-batch's summed loss divided by k.

    python benchmarks/terms_real.py [--windows 4]
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

import gradaccum
from gradaccum.recipes.assets import default_model_dir, drug_reviews

LABELS = ["negative", "neutral", "positive"]
K, BATCH, MLM = 4, 4, 0.5


class Classifier(torch.nn.Module):
    def __init__(self, path):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = AutoModel.from_pretrained(path)
        self.head = torch.nn.Linear(self.encoder.config.hidden_size, len(LABELS))


def collate(tok, rows: list[tuple[int, dict]]) -> dict:
    enc = tok([r["review"] for _, r in rows], padding=True, truncation=True, max_length=128, return_tensors="pt")
    ids, att = enc["input_ids"], enc["attention_mask"]
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    for row, (index, _) in enumerate(rows):  # each review's masked positions depend on it alone
        g = torch.Generator().manual_seed(index)
        n = int(att[row].sum())
        chosen[row, 1:n - 1] = torch.rand(n - 2, generator=g) < 0.15
    return {"input_ids": ids.masked_fill(chosen, tok.mask_token_id), "attention_mask": att, "chosen": chosen,
            "targets": ids[chosen], "labels": torch.tensor([LABELS.index(r["label"]) for _, r in rows])}


def losses(model, b) -> dict:
    hidden = model.encoder(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    sentiment = F.cross_entropy(model.head(hidden[:, 0]), b["labels"])
    logits = hidden[b["chosen"]] @ model.encoder.embeddings.word_embeddings.weight.T
    return {"sentiment": (sentiment, len(b["labels"])), "mlm": (MLM * F.cross_entropy(logits, b["targets"]),
                                                                  int(b["chosen"].sum()))}


COUNTERS = {"sentiment": lambda b: len(b["labels"]), "mlm": lambda b: int(b["chosen"].sum())}


def grads(model, micro, how: str) -> list[list[torch.Tensor]]:
    model = copy.deepcopy(model)
    opt = gradaccum_recording(model)
    if how == "divide by k":
        seen = []
        for w in range(0, len(micro), K):
            for b in micro[w:w + K]:
                t = losses(model, b)
                (sum(v[0] for v in t.values()) / K).backward()
            seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
            model.zero_grad(set_to_none=True)
        return seen
    acc = gradaccum.Accumulator(model, opt, steps=K, terms=COUNTERS if how == "terms" else None)
    for window in acc.windows(micro):
        for b in window:
            t = losses(model, b)
            if how == "terms":
                window.backward(t)
            else:
                n = t["sentiment"][1] if how == "one weight (reviews)" else t["mlm"][1]
                window.backward(sum(v[0] for v in t.values()), num_items=n)
        window.step()
    return opt.seen


def gradaccum_recording(model):
    class Recording(torch.optim.SGD):
        def __init__(self, params):
            super().__init__(params, lr=0.0)
            self.seen = []

        def step(self, closure=None):
            self.seen.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                              for g in self.param_groups for p in g["params"]])

    return Recording(model.parameters())


def big_batch(model, tok, rows) -> list[torch.Tensor]:
    ref = copy.deepcopy(model).double()
    t = losses(ref, collate(tok, rows))
    sum(v[0] for v in t.values()).backward()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]


def rel(got, want) -> float:
    g = torch.cat([x.double().flatten() for x in got])
    w = torch.cat([x.flatten() for x in want])
    return float((g - w).norm() / w.norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=4)
    args = ap.parse_args()
    path = default_model_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = Classifier(path).eval()  # dropout off: micro-batches and big batch see one function
    rows = list(enumerate(drug_reviews("train")))[: K * BATCH * args.windows]
    micro = [collate(tok, rows[i:i + BATCH]) for i in range(0, len(rows), BATCH)]
    wants = [big_batch(model, tok, rows[w * K * BATCH:(w + 1) * K * BATCH]) for w in range(args.windows)]
    print(f"MiniLM, {args.windows} windows of {K} x {BATCH} drug reviews; sentiment + {MLM} x MLM")
    for how in ("terms", "one weight (reviews)", "one weight (tokens)", "divide by k"):
        errors = [rel(g, w) for g, w in zip(grads(model, micro, how), wants)]
        print(f"{how:22s} relative error: median {statistics.median(errors):.3g}, max {max(errors):.3g}")


if __name__ == "__main__":
    main()
