"""TRL's ``SFTTrainer`` with ``ExactAccumulationMixin`` against the big batch.

The reference is the stock ``SFTTrainer`` at batch 12 with no accumulation, told not to pass
``num_items_in_batch`` (``model_accepts_loss_kwargs = False``), so its loss is the model's
own mean over the labelled tokens of the whole batch. The run under test is micro-batch 4 at
k=3. Gradients are compared at every optimizer step. ``SFTConfig`` turns on bf16 by default
(even on the CPU); these runs are fp32, so that a difference means a wrong weighting and not
rounding.
"""

from __future__ import annotations

import pytest
import torch

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from gradaccum.transformers import ExactAccumulationMixin  # noqa: E402
from support.hf import VOCAB, gpt2, prompt_completion_rows, tokenizer  # noqa: E402,F401

class ExactSFTTrainer(ExactAccumulationMixin, trl.SFTTrainer):
    pass


class Gradients(transformers.TrainerCallback):
    """The gradient the optimizer is about to apply, at every step."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]).double().clone())


def gradients(trainer_cls, data, tmp_path, batch, k, packing=False, own_mean=False, make_model=gpt2):
    args = trl.SFTConfig(
        output_dir=str(tmp_path / f"{trainer_cls.__name__}-{batch}x{k}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=k, num_train_epochs=1, learning_rate=0.0, optim="sgd", max_grad_norm=0.0,
        seed=7, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, bf16=False,
        dataloader_num_workers=0, disable_tqdm=True, completion_only_loss=True,
        packing=packing, max_length=32 if packing else None,
    )
    grads = Gradients()
    trainer = trainer_cls(model=make_model(), args=args, train_dataset=data, processing_class=tokenizer(),
                          callbacks=[grads])
    if own_mean:
        trainer.model_accepts_loss_kwargs = False  # the model's own mean: the big batch, or the naive per-micro-batch mean
    trainer.train()
    return grads.steps


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n, packing", [(36, False), (30, False), (90, True)],
                         ids=["completion-only", "completion-only-partial-last-window", "packed-padding-free"])
def test_sft_trainer_with_the_mixin_equals_the_big_batch(tmp_path, n, packing):
    """Completion-only loss counts completion tokens; packing counts tokens after each sequence's first."""
    data = prompt_completion_rows(n)
    big = gradients(trl.SFTTrainer, data, tmp_path, batch=12, k=1, packing=packing, own_mean=True)
    exact = gradients(ExactSFTTrainer, data, tmp_path, batch=4, k=3, packing=packing)
    naive = gradients(trl.SFTTrainer, data, tmp_path, batch=4, k=3, packing=packing, own_mean=True)
    assert len(big) == len(exact) >= 2
    errors = [relative(got, want) for got, want in zip(exact, big)]
    assert max(errors) < 1e-5, errors
    # A mean of micro-batch means weighs short completions up: the check can fail.
    assert max(relative(m, want) for m, want in zip(naive, big)) > 100 * max(max(errors), 1e-7)


def test_sft_trainer_with_a_router_loss_equals_the_big_batch(tmp_path):
    # An MoE model (Mixtral, tiny config): SFT adds the router loss of each micro-batch whole;
    # with the mixin it is the window's, counted ahead.
    from support import moe

    data = prompt_completion_rows(24)
    make = lambda: moe.model("mixtral")  # noqa: E731
    big = gradients(trl.SFTTrainer, data, tmp_path, batch=12, k=1, own_mean=True, make_model=make)
    exact = gradients(ExactSFTTrainer, data, tmp_path, batch=4, k=3, make_model=make)
    stock = gradients(trl.SFTTrainer, data, tmp_path, batch=4, k=3, make_model=make)
    assert len(big) == len(exact) == 2
    errors = [relative(got, want) for got, want in zip(exact, big)]
    assert max(errors) < 1e-5, errors
    assert max(relative(s, want) for s, want in zip(stock, big)) > 0.02
