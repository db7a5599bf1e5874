"""Tiny Hugging Face models, rows and trainers the Transformers and TRL tests share (random
weights built from configs; nothing is loaded from a hub)."""

from __future__ import annotations

import torch
import transformers

VOCAB = 60


def bert_classifier(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def gpt2_lm(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(cfg)


class Rows(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def variable_length_rows(n: int, causal: bool, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        length = int(torch.randint(3, 30, (1,), generator=g))  # very uneven lengths
        ids = torch.randint(2, VOCAB, (length,), generator=g).tolist()
        label = ids if causal else int(torch.randint(0, 3, (1,), generator=g))
        rows.append({"input_ids": ids, "labels": label})
    return Rows(rows)


def pad_collator(causal: bool):
    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)  # dynamic padding: each micro-batch its own width
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        labels = torch.full((len(rows), width), -100) if causal else torch.tensor([r["labels"] for r in rows])
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            mask[i, :n] = 1
            if causal:
                labels[i, :n] = torch.tensor(r["labels"])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def train(trainer_cls, model, data, collate, tmp_path, batch, k, max_grad_norm=1.0, own_mean=False, use_cpu=True,
          **extra):
    args = transformers.TrainingArguments(**extra, use_cpu=use_cpu,
        output_dir=str(tmp_path / f"{trainer_cls.__module__}-{batch}x{k}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=k, num_train_epochs=1, learning_rate=5e-3, max_grad_norm=max_grad_norm,
        seed=7, report_to=[], save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=collate)
    if own_mean:
        trainer.model_accepts_loss_kwargs = False  # the model's own mean loss (see the module docstring)
    trainer.train()
    return model


@torch.no_grad()
def max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))



def tokenizer():
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = __import__('tokenizers').Tokenizer(__import__('tokenizers').models.WordLevel(vocab, unk_token="t0"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=128,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def prompt_completion_rows(n: int, seed: int = 3):
    """Pre-tokenised rows: a prompt of 2-11 tokens, then a completion of 1-19 (very uneven)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        prompt, completion = int(torch.randint(2, 12, (1,), generator=g)), int(torch.randint(1, 20, (1,), generator=g))
        ids = torch.randint(2, VOCAB, (prompt + completion,), generator=g).tolist()
        rows.append({"input_ids": ids, "completion_mask": [0] * prompt + [1] * completion})
    return __import__('datasets').Dataset.from_list(rows)


