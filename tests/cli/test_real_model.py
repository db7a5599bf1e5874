"""Real parts: the pretrained MiniLM encoder classifying real drug reviews."""

from __future__ import annotations

import copy

import pytest
import torch

import gradaccum
from support.reference import RecordingSGD, rel_error

transformers = pytest.importorskip("transformers")
from gradaccum.recipes.assets import default_model_dir, drug_reviews  # noqa: E402

LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def minilm():
    path = default_model_dir()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    model.eval()  # dropout off: the big batch and the micro-batches must see the same function
    return tok, model


def test_minilm_uneven_padded_micro_batches_equal_the_big_batch(minilm):
    tok, model = minilm
    rows = drug_reviews("train")[:10]
    texts = [r["review"] for r in rows]
    labels = torch.tensor([LABELS.index(r["label"]) for r in rows])
    sizes = [3, 1, 4, 2]
    micro, i = [], 0
    for s in sizes:
        enc = tok(texts[i : i + s], padding=True, truncation=True, max_length=64, return_tensors="pt")
        micro.append((dict(enc), labels[i : i + s]))
        i += s
    assert len({m[0]["input_ids"].shape[1] for m in micro}) > 1, "micro-batches must be padded differently"

    work = copy.deepcopy(model)
    opt = RecordingSGD(work.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(work, opt, steps=len(sizes))
    for window in acc.windows(micro):
        for enc, y in window:
            out = work(**enc, labels=y)
            window.backward(out.loss, num_items=len(y))
        report = window.step()
    assert report.micro_batches == 4 and report.num_items == 10

    ref = copy.deepcopy(model).double()
    big = tok(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    ref(**big, labels=labels).loss.backward()
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]
    assert rel_error(opt.seen[0], want) <= 1e-4
