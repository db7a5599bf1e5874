"""TRL's DPOTrainer on a tiny GPT-2 built in memory, and the float64 big batch of each step.

Preference pairs with prompts and completions of different lengths; 10 pairs at 4 per
micro-batch and k = 3, so the one window holds micro-batches of 4, 4 and 2 pairs (a partial
last micro-batch). Every micro-batch the trainer computes a loss on is recorded, with the
gradient about to be applied and the weights it is applied to. ``reference`` recomputes the
sigmoid DPO loss over all the step's pairs (every rank's) as one batch in float64, from the
policy's weights and the initial (reference) model.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

import datasets
import trl

import gradaccum
from gradaccum.transformers import ExactAccumulationMixin
from support.grpo_cells import VOCAB, Recorder, gpt2, tokenizer

BETA = 0.1


class ExactDPOTrainer(ExactAccumulationMixin, trl.DPOTrainer):
    pass


def pairs(n: int, seed: int = 9) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)

    def text(lo, hi):
        return " ".join(f"t{int(t)}" for t in torch.randint(2, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g))

    return datasets.Dataset.from_list([{"prompt": text(2, 6), "chosen": " " + text(1, 9), "rejected": " " + text(1, 9)}
                                       for _ in range(n)])


def run(exact: bool, out: str, n: int = 10, batch: int = 4, k: int = 3, **extra) -> dict:
    base = ExactDPOTrainer if exact else trl.DPOTrainer

    class Recording(base):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.seen_inputs.append({key: inputs[key].detach().clone() for key in
                                         ("input_ids", "attention_mask", "completion_mask")})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    args = trl.DPOConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=k, num_train_epochs=1,
        learning_rate=0.05, optim="sgd", max_grad_norm=0.0, beta=BETA, seed=7, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, bf16=False, dataloader_num_workers=0, disable_tqdm=True, **extra)
    rec = Recorder()
    trainer = Recording(model=gpt2(), ref_model=gpt2(), args=args, train_dataset=pairs(n), processing_class=tokenizer(),
                        callbacks=[rec])
    trainer.seen_inputs = []
    trainer.train()
    return {"inputs": trainer.seen_inputs, "grads": rec.grads, "weights": rec.weights, "k": k}


def _sequence_logps(model, b) -> torch.Tensor:
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
    lp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (lp * b["completion_mask"][:, 1:]).sum(1)


def reference(ranks: list[dict], step: int) -> list[torch.Tensor]:
    k = ranks[0]["k"]
    policy, ref = gpt2().double(), gpt2().double()
    policy.load_state_dict({n: v.double() for n, v in ranks[0]["weights"][step].items()})
    margins = []
    for r in ranks:
        for b in r["inputs"][step * k:(step + 1) * k]:
            pc, pr = _sequence_logps(policy, b).chunk(2)
            with torch.no_grad():
                rc, rr = _sequence_logps(ref, b).chunk(2)
            margins.append((pc - rc) - (pr - rr))
    (-F.logsigmoid(BETA * torch.cat(margins)).mean()).backward()
    return [p.grad for p in policy.parameters()]


def main() -> None:
    """Under torchrun: ``python dpo_cells.py OUT`` saves this rank's stock and exact runs."""
    import sys

    out = sys.argv[1]
    # Across ranks Accelerate pads the last micro-batch with repeated pairs (and the stock trainer
    # hangs without that padding): 17 pairs per rank make windows of 3 and 2 full micro-batches.
    runs = {exact: run(exact, out, n=34) for exact in (False, True)}
    torch.save(runs, os.path.join(out, f"rank-{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main()
    gradaccum.end_rank()  # exit 0 once written (a finished rank can abort in gloo's teardown)
