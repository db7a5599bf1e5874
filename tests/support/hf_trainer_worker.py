"""Run under torchrun: tiny GPT-2 trained by gradaccum's Trainer, 2 ranks x 2 rows x k=3.

Rank 0 saves the final weights to the path given as the first argument. A second argument,
a ZeRO stage, trains under ``TrainingArguments(deepspeed=...)``; a third, ``sft``, uses TRL's
``SFTTrainer`` with the mixin instead of gradaccum's ``Trainer`` (``stock``: the stock Trainer).
"""

from __future__ import annotations

import os
import pathlib
import sys

import torch

from support.hf import gpt2_lm, pad_collator, train, variable_length_rows

import gradaccum
from gradaccum.transformers import ExactAccumulationMixin, Trainer


def deepspeed_config(stage: int) -> dict:
    """What a user writes for the Trainer: "auto" wherever the TrainingArguments decide."""
    return {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True}


def trainer_class(kind: str):
    if kind == "stock":
        import transformers

        return transformers.Trainer
    return Trainer


def train_sft(trainer_cls, directory: pathlib.Path, batch: int, k: int, own_mean: bool = False, **extra):
    """TRL's SFTTrainer on prompt/completion rows (completion-only loss), AdamW, fp32."""
    import trl
    from support.hf import gpt2, prompt_completion_rows, tokenizer

    args = trl.SFTConfig(
        output_dir=str(directory / f"sft-{batch}x{k}"), per_device_train_batch_size=batch, gradient_accumulation_steps=k,
        num_train_epochs=1, learning_rate=5e-3, max_grad_norm=1.0, seed=7, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True,
        completion_only_loss=True, **extra)
    model = gpt2()
    trainer = trainer_cls(model=model, args=args, train_dataset=prompt_completion_rows(36), processing_class=tokenizer())
    if own_mean:
        trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return model


def exact_sft():
    import trl

    class ExactSFT(ExactAccumulationMixin, trl.SFTTrainer):
        pass

    return ExactSFT


if __name__ == "__main__":
    out = pathlib.Path(sys.argv[1])
    extra = {}
    if len(sys.argv) > 2 and sys.argv[2] != "none":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        extra["deepspeed"] = deepspeed_config(int(sys.argv[2]))
    kind = sys.argv[3] if len(sys.argv) > 3 else "trainer"
    if kind == "sft":
        model = train_sft(exact_sft(), out.parent, batch=2, k=3, **extra)
    elif kind == "moe":  # a Mixtral with its router loss on (support.moe)
        from support import moe

        data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
        model = train(Trainer, moe.model("mixtral"), data, collate, out.parent, batch=2, k=3)
    else:
        data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
        model = train(trainer_class(kind), gpt2_lm(), data, collate, out.parent, batch=2, k=3, **extra)
    state = None
    if extra:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):  # ZeRO-3: the full weights
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    elif torch.distributed.get_rank() == 0:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if torch.distributed.get_rank() == 0:
        torch.save(state, out)
    torch.distributed.barrier()  # every rank's work is done: end together, exit 0
    gradaccum.end_rank()
