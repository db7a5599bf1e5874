"""`gradaccum train --task retrieval`: the in-batch loss, and the recipe end to end on the real MiniLM."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from gradaccum.cli import main  # noqa: E402
from gradaccum.recipes import retrieval  # noqa: E402
from gradaccum.recipes.config import TrainConfig  # noqa: E402

TINY = ["--train-limit", "24", "--eval-limit", "16", "--max-length", "32", "--effective-batch", "8", "--micro-batch", "3"]


def test_duplicates_of_a_condition_are_not_negatives():
    """Reference: each query scored against the distinct conditions of the batch, one document each."""
    g = torch.Generator().manual_seed(0)
    conditions = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    docs_of = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    q = F.normalize(torch.randn(7, 8, generator=g, dtype=torch.float64), dim=-1)
    d = docs_of[conditions]  # the same condition is the same document text
    want = 0.0
    for i in range(7):
        scores = torch.stack([retrieval.SCALE * q[i] @ docs_of[c] for c in conditions.unique()])
        want += float(-torch.log_softmax(scores, 0)[int(conditions[i])])
    want /= 7
    assert float(retrieval.in_batch_loss(q, d, conditions)) == pytest.approx(want, rel=1e-6)
    # Counting the duplicates as negatives (or twice) gives another loss: the check can fail.
    plain = F.cross_entropy(retrieval.SCALE * q.float() @ d.float().T, torch.arange(7))
    assert abs(float(plain) - want) > 0.05


def test_task_defaults_apply_unless_given(tmp_path):
    from gradaccum.recipes.config import with_task_defaults

    cfg = TrainConfig(**with_task_defaults({"task": "retrieval", "micro_batch": 16}))
    assert (cfg.effective_batch, cfg.micro_batch, cfg.steps_per_window) == (64, 16, 4)
    assert TrainConfig(**with_task_defaults({"task": "sentiment"})).effective_batch == TrainConfig().effective_batch


def test_retrieval_end_to_end_and_resume(tmp_path, capsys):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    args = ["train", "--task", "retrieval", "--epochs", "1", "--save-every", "1", *TINY]
    assert main([*args, "--out", str(straight)]) == 0
    printed = capsys.readouterr().out
    assert "accuracy@1" in printed and "untuned model" in printed
    s = json.loads((straight / "summary.json").read_text())
    assert s["task"] == "retrieval" and s["k"] == 3 and s["optimizer_steps"] == 3
    assert {"accuracy@1", "mrr"} <= set(s["eval"]) and {"accuracy@1", "mrr"} <= set(s["baseline"])
    assert 0 < s["eval"]["mrr"] <= 1
    cfg = TrainConfig(**{**json.loads((straight / "config.json").read_text()), "out": str(broken)})
    assert retrieval.run(cfg, stop_after=2, log=lambda _m: None)["stopped_at"] == 2
    assert main(["train", "--resume", str(broken)]) == 0
    a = load_file(sorted((straight / "checkpoints").iterdir())[-1] / "model.safetensors")
    b = load_file(sorted((broken / "checkpoints").iterdir())[-1] / "model.safetensors")
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-6), key
