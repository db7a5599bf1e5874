"""TRL's GRPOTrainer and DPOTrainer with ``ExactAccumulationMixin`` (nothing more) against the
float64 big batch.

For loss types bnpo, grpo, dr_grpo and dapo, ``steps_per_generation`` k and 2k, the entropy
bonus off and on: the gradient of every optimizer step equals the gradient of that step's
objective over all its completions (every rank's) as one batch, recomputed in float64 without
the trainer (``grpo_cells.reference``). The stock trainer runs beside it on the same
completions; where its normalization is a mean of micro-batch means, it must be off, or
the check could not tell. DPO: a window whose last micro-batch holds fewer pairs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from support import launch

pytest.importorskip("trl")
from support import dpo_cells as dc  # noqa: E402
from support import grpo_cells as gc  # noqa: E402

# Where stock GRPO normalizes per micro-batch: bnpo always; dapo once a generation spans two
# windows; the entropy bonus (a per-micro-batch token mean divided by k) in every loss type.
def stock_is_off(loss_type: str, spg: int, entropy: float) -> bool:
    return loss_type == "bnpo" or (loss_type == "dapo" and spg > gc.K) or entropy > 0


def _check(results: dict, ranks: int) -> None:
    for (loss_type, spg, entropy, exact), _ in results[0].items():
        runs = [r[(loss_type, spg, entropy, exact)] for r in results]
        where = f"{ranks} rank(s) {loss_type} spg={spg} entropy={entropy} {'exact' if exact else 'stock'}"
        assert len(runs[0]["grads"]) == 2, where
        errors = [gc.relative(runs[0]["grads"][s], gc.reference(runs, s, loss_type, entropy)) for s in range(2)]
        if exact:
            assert max(errors) <= 1e-5, f"{where}: {errors}"
        elif stock_is_off(loss_type, spg, entropy):
            assert max(errors) > 1e-3, f"{where}: stock was expected off, {errors}"
        else:
            assert max(errors) <= 1e-5, f"{where}: stock was expected exact, {errors}"
        for other in runs[1:]:  # every rank applied the same update
            assert all(torch.equal(a, b) for x, y in zip(runs[0]["grads"], other["grads"]) for a, b in zip(x, y))


def test_grpo_one_process(tmp_path):
    _check([gc.grid(str(tmp_path))], 1)


@pytest.mark.multiprocess
def test_grpo_two_ranks(tmp_path):
    _check(_torchrun("grpo_cells", tmp_path), 2)


@pytest.mark.parametrize("change, message", [
    ({"steps_per_generation": 4}, "multiple of gradient_accumulation_steps"),
    ({"top_entropy_quantile": 0.5}, "top_entropy_quantile=0.5"),
    # The bonus off: the quantile still picks the policy loss's tokens per micro-batch (was 0.39-0.49 off).
    ({"top_entropy_quantile": 0.5, "entropy": 0.0}, "top_entropy_quantile=0.5"),
])
def test_what_cannot_be_exact_is_refused_before_training(tmp_path, change, message):
    spg = change.pop("steps_per_generation", gc.K)
    entropy = change.pop("entropy", 0.05)
    args = gc.config(str(tmp_path), "bnpo", gc.K, spg, entropy, **change)
    trainer = gc.ExactGRPOTrainer(model=gc.gpt2(), reward_funcs=gc.reward, args=args, train_dataset=gc.prompts(16),
                                  processing_class=gc.tokenizer())
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(ValueError, match=message):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


def _torchrun(module: str, out) -> list:
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", f"support.{module}", str(out)],
        capture_output=True, text=True, env=launch.env(), timeout=300)
    assert launch.finished(proc), proc.stderr[-3000:]
    return [torch.load(out / f"rank-{r}.pt", weights_only=False) for r in range(2)]


def _check_dpo(ranks: list[dict], exact: bool, where: str, partial: bool = True) -> None:
    sizes = [int(b["input_ids"].shape[0]) // 2 for b in ranks[0]["inputs"]]
    assert len(set(sizes)) > 1 or not partial, f"{where}: micro-batches of {sizes} pairs, none partial"
    errors = [gc.relative(ranks[0]["grads"][s], dc.reference(ranks, s)) for s in range(len(ranks[0]["grads"]))]
    if exact or not partial:
        assert max(errors) <= 1e-5, f"{where}: {errors}"
    else:
        assert max(errors) > 1e-2, f"{where}: stock was expected off, {errors}"


def test_dpo_one_process(tmp_path):
    for exact in (False, True):
        _check_dpo([dc.run(exact, str(tmp_path))], exact, f"1 process {'exact' if exact else 'stock'}")


@pytest.mark.multiprocess
def test_dpo_two_ranks(tmp_path):
    # Accelerate pads every rank's last micro-batch with repeated pairs, so no micro-batch is
    # partial here and stock is exact too (a last window of 2 micro-batches included).
    ranks = _torchrun("dpo_cells", tmp_path)
    assert len(ranks[0][True]["grads"]) == 2
    for exact in (False, True):
        _check_dpo([r[exact] for r in ranks], exact, f"2 ranks {'exact' if exact else 'stock'}", partial=False)


def test_dpo_losses_that_are_not_per_pair_are_refused(tmp_path):
    with pytest.raises(ValueError, match="'sft' is a mean over the chosen"):
        dc.run(True, str(tmp_path), loss_type=["sigmoid", "sft"])


def test_the_docs_classes_are_the_ones_tested():
    # docs/transformers.md's GRPO/DPO block, as written: two subclasses and nothing more.
    import pathlib
    import re

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "transformers.md").read_text()
    block = re.search(r"### TRL `GRPOTrainer` and `DPOTrainer`\n\n```python\n(.*?)```", doc, re.S).group(1)
    namespace: dict = {}
    exec(block, namespace)
    assert [c.__name__ for c in namespace["ExactGRPOTrainer"].__mro__[1:3]] == ["ExactAccumulationMixin", "GRPOTrainer"]
    assert [c.__name__ for c in gc.ExactGRPOTrainer.__mro__[1:3]] == ["ExactAccumulationMixin", "GRPOTrainer"]
    assert [c.__name__ for c in namespace["ExactDPOTrainer"].__mro__[1:3]] == ["ExactAccumulationMixin", "DPOTrainer"]
