"""TRL's GRPOTrainer on a tiny GPT-2 built in memory, and the float64 big batch of each step.

Prompts of 2-6 tokens; the model ends a completion with probability about 1/4 per token, so
completions run from 1 to ``MAX_COMPLETION`` tokens. The reward is deterministic (the
completion's share of even token ids). Every micro-batch the trainer computes its loss on
(after generation) is recorded with its rank, and the gradient the optimizer is about to
apply and the weights it applies it to are recorded at every step. ``reference`` then
computes, in float64 and without the trainer, each step's objective over all the
completions of that step (every rank's) as one batch, and its gradient.
"""

from __future__ import annotations

import os

import torch

import trl
import transformers
import datasets
import tokenizers

import gradaccum
from gradaccum.transformers import ExactAccumulationMixin

VOCAB = 40
MAX_COMPLETION = 8
EPS = 0.2  # GRPO's clip range (epsilon_low = epsilon_high)


class ExactGRPOTrainer(ExactAccumulationMixin, trl.GRPOTrainer):
    pass


def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t2"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
                                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    # End of sequence likely (about 1 in 4 per token), so completion lengths spread over 1..8.
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB))
    with torch.no_grad():
        model.lm_head.weight[1] = 0.0
        model.lm_head.bias[1] = 2.2
    return model


def prompts(n: int, seed: int = 5) -> datasets.Dataset:
    g = torch.Generator().manual_seed(seed)
    rows = [{"prompt": " ".join(f"t{int(t)}" for t in torch.randint(2, VOCAB, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g))}
            for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def reward(completions, completion_ids=None, **kwargs):
    """Deterministic: the share of even token ids in the completion."""
    return [sum(1 for t in ids if t % 2 == 0) / max(len(ids), 1) for ids in completion_ids]


class Recorder(transformers.TrainerCallback):
    """The gradient about to be applied and the weights it is applied to, at every step."""

    def __init__(self):
        self.grads, self.weights = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().double().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                           for p in model.parameters()])
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})


def recording(cls):
    """``cls`` that also keeps every micro-batch it computes a loss on (train mode)."""

    class Recording(cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                keep = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
                        "old_per_token_logps")
                self.seen_inputs.append({k: v.detach().clone() for k, v in inputs.items() if k in keep and v is not None})
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    Recording.__name__ = f"Recording{cls.__name__}"
    return Recording


def config(out: str, loss_type: str, k: int, spg: int, entropy: float, batch: int = 2, steps: int = 2, **extra):
    return trl.GRPOConfig(
        output_dir=out, per_device_train_batch_size=batch, gradient_accumulation_steps=k, steps_per_generation=spg,
        num_generations=2, max_completion_length=MAX_COMPLETION, loss_type=loss_type, entropy_coef=entropy,
        learning_rate=0.05, optim="sgd", max_grad_norm=0.0, beta=0.0, epsilon=EPS, temperature=1.0,
        max_steps=steps, seed=7, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        bf16=False, dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False, **extra)


def run(exact: bool, out: str, loss_type: str, k: int, spg: int, entropy: float = 0.0, steps: int = 2) -> dict:
    """Train; return the recorded micro-batches, gradients and weights (this rank's)."""
    cls = recording(ExactGRPOTrainer if exact else trl.GRPOTrainer)
    rec = Recorder()
    trainer = cls(model=gpt2(), reward_funcs=reward, args=config(out, loss_type, k, spg, entropy, steps=steps),
                  train_dataset=prompts(64), processing_class=tokenizer(), callbacks=[rec])
    trainer.seen_inputs = []
    trainer.train()
    return {"inputs": trainer.seen_inputs, "grads": rec.grads, "weights": rec.weights, "k": k}


def _pad_cat(tensors, side):
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = torch.zeros(t.shape[0], width - t.shape[1], dtype=t.dtype)
        out.append(torch.cat([pad, t] if side == "left" else [t, pad], dim=1))
    return torch.cat(out)


def reference(ranks: list[dict], step: int, loss_type: str, entropy: float) -> list[torch.Tensor]:
    """The float64 gradient of step ``step``'s objective over every rank's completions as one batch."""
    k = ranks[0]["k"]
    model = gpt2().double()
    model.load_state_dict({n: v.double() for n, v in ranks[0]["weights"][step].items()})
    micro = [r["inputs"][i] for r in ranks for i in range(step * k, (step + 1) * k)]
    logps, ents, old, adv, masks = [], [], [], [], []
    for b in micro:  # each micro-batch as the trainer laid it out (left-padded prompt, then completion)
        ids = torch.cat([b["prompt_ids"], b["completion_ids"]], 1)
        att = torch.cat([b["prompt_mask"], b["completion_mask"]], 1)
        c = b["completion_ids"].shape[1]
        logits = model(input_ids=ids, attention_mask=att).logits[:, -c - 1:-1]
        lp = torch.log_softmax(logits, -1)
        logps.append(lp.gather(-1, b["completion_ids"].unsqueeze(-1)).squeeze(-1))
        ents.append(-(lp.exp() * lp).sum(-1))
        old.append(b["old_per_token_logps"].double() if "old_per_token_logps" in b else logps[-1].detach())
        adv.append(b["advantages"].double())
        masks.append(b["completion_mask"].double())
    logp, ent, old, mask = (_pad_cat(x, "right") for x in (logps, ents, old, masks))
    adv = torch.cat(adv).unsqueeze(1)
    ratio = torch.exp(logp - old)
    per_token = -torch.min(ratio * adv, ratio.clamp(1 - EPS, 1 + EPS) * adv)
    if loss_type == "grpo":
        policy = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif loss_type in ("bnpo", "dapo"):
        policy = (per_token * mask).sum() / mask.sum()
    elif loss_type == "dr_grpo":
        policy = (per_token * mask).sum() / (mask.shape[0] * MAX_COMPLETION)
    loss = policy - entropy * (ent * mask).sum() / mask.sum()
    loss.backward()
    return [p.grad for p in model.parameters()]


def relative(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    g, w = torch.cat([x.flatten() for x in got]), torch.cat([x.flatten() for x in want])
    return float((g - w).norm() / w.norm())


LOSS_TYPES = ["bnpo", "grpo", "dr_grpo", "dapo"]
K = 3
GRID = [(lt, spg, entropy) for lt in LOSS_TYPES for spg in (K, 2 * K) for entropy in (0.0, 0.05)]
# On two ranks what is new is the normalisers' sums over ranks: every loss type with a
# generation spanning two windows and the bonus on (stock off in each), and dapo within
# one window without it (stock exact: the check must tell both apart on ranks too).
RANKS_GRID = [(lt, 2 * K, 0.05) for lt in LOSS_TYPES] + [("dapo", K, 0.0)]


def grid(out: str, cells: list[tuple[str, int, float]] = GRID) -> dict:
    """Each (loss type, steps_per_generation, entropy_coef) of ``cells``, stock and exact."""
    results = {}
    for lt, spg, entropy in cells:
        for exact in (False, True):
            results[(lt, spg, entropy, exact)] = run(exact, out, lt, K, spg, entropy)
    return results


def main() -> None:
    """Under torchrun: ``python grpo_cells.py OUT`` runs ``RANKS_GRID``, saves this rank's runs."""
    import sys

    out = sys.argv[1]
    torch.save(grid(out, RANKS_GRID), os.path.join(out, f"rank-{os.environ.get('RANK', '0')}.pt"))


if __name__ == "__main__":
    main()
    gradaccum.end_rank()  # exit 0 once written (a finished rank can abort in gloo's teardown)
