"""gradaccum.transformers: Trainer with exact accumulation against Trainer with the big batch.

The reference is the stock ``transformers.Trainer`` at batch 12 with no accumulation; the run
under test is the same model, data and seed at micro-batch 4 and k=3. Dropout is off so the
two runs differ only in how the gradient of each step is put together.

The reference Trainer is told that the model does not take ``num_items_in_batch``, so it
uses the model's own mean over its batch of 12. Left to itself, Trainer passes GPT-2 a
count that ignores the causal shift (``GPT2LMHeadModel.loss_type`` is None, so Trainer's
shift rule does not apply): 217 labels for 205 predictions in the first batch here, and a
loss 205/217 of the mean even without accumulation.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradaccum.transformers import Trainer, count_items, item_kind  # noqa: E402
from support.hf import (VOCAB, bert_classifier, gpt2_lm, max_diff, pad_collator, train,  # noqa: E402
                        variable_length_rows)

moved = max_diff


@pytest.mark.parametrize("n", [36, 30])  # 30: the epoch ends on a window of 2 micro-batches (4 + 2 rows)
def test_bert_classifier_accumulated_equals_the_big_batch(tmp_path, n):
    data, collate = variable_length_rows(n, causal=False), pad_collator(causal=False)
    start = bert_classifier()
    big = train(transformers.Trainer, bert_classifier(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    exact = train(Trainer, bert_classifier(), data, collate, tmp_path, batch=4, k=3)
    stock = train(transformers.Trainer, bert_classifier(), data, collate, tmp_path, batch=4, k=3)
    step = moved(big, start)
    assert step > 1e-3  # the runs moved, so equality below means something
    assert max_diff(exact, big) < 1e-5 * step / 1e-3, max_diff(exact, big)
    # Trainer's own accumulation gives this model k times the gradient: the check can fail.
    assert max_diff(stock, big) > 20 * max_diff(exact, big)


def test_gpt2_variable_length_accumulated_equals_the_big_batch(tmp_path):
    data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
    start = gpt2_lm()
    big = train(transformers.Trainer, gpt2_lm(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    exact = train(Trainer, gpt2_lm(), data, collate, tmp_path, batch=4, k=3)
    assert moved(big, start) > 1e-3
    assert max_diff(exact, big) < 1e-5, max_diff(exact, big)
    # Stock Trainer at batch 12 scales each step by (predictions / labels): the check can fail.
    miscounted = train(transformers.Trainer, gpt2_lm(), data, collate, tmp_path, batch=12, k=1)
    assert max_diff(miscounted, big) > 10 * max_diff(exact, big)


def test_gpt2_per_micro_batch_mean_would_fail(tmp_path):
    """Dividing each micro-batch's mean by k (the seeds' loop) is visibly off on these lengths."""
    data, collate = variable_length_rows(12, causal=True), pad_collator(causal=True)
    model = gpt2_lm()
    batches = [collate([data[i] for i in range(j, j + 4)]) for j in (0, 4, 8)]
    model.zero_grad()
    model(**collate([data[i] for i in range(12)])).loss.backward()
    ref = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    for b in batches:
        (model(**b).loss / 3).backward()
    naive = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    total = sum(count_items(b, "causal-lm") for b in batches)
    for b in batches:
        (model(**b).loss * count_items(b, "causal-lm") / total).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert (naive - ref).norm() / ref.norm() > 0.02
    assert (exact - ref).norm() / ref.norm() < 1e-5


def test_count_items_follows_each_loss():
    labels = torch.tensor([[5, 6, 7, -100], [8, -100, -100, -100]])
    assert count_items({"labels": labels}, "causal-lm") == 2  # row 2 has nothing after its first token
    assert count_items({"labels": labels, "shift_labels": labels}, "causal-lm") == 4
    assert count_items({"labels": labels}, "tokens") == 4
    assert count_items({"labels": torch.tensor([1, -100, 0])}, "samples") == 2
    assert count_items({"labels": torch.rand(5, 3)}, "samples") == 5  # multi-label: rows
    assert count_items({"input_ids": torch.zeros(6, 2)}, "samples") == 6
    with pytest.raises(ValueError, match="kind"):
        count_items({"labels": labels}, "words")
    with pytest.raises(ValueError, match="labels"):
        count_items({"input_ids": labels}, "tokens")


@torch.no_grad()
def test_count_items_agrees_with_the_models_own_loss():
    """The count is the denominator the model uses: its mean times the count is the sum."""
    data, collate = variable_length_rows(5, causal=True), pad_collator(causal=True)
    batch = collate([data[i] for i in range(5)])
    model = gpt2_lm()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1),
                                            ignore_index=-100, reduction="sum")
    mean = model(**batch).loss.double()
    assert float(mean * count_items(batch, "causal-lm")) == pytest.approx(float(nll), rel=1e-5)


def test_item_kind_reads_the_head():
    assert item_kind(bert_classifier()) == "samples"
    assert item_kind(gpt2_lm()) == "causal-lm"
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=16)
    assert item_kind(transformers.BertForMaskedLM(cfg)) == "tokens"
    assert item_kind(transformers.BertForTokenClassification(cfg)) == "tokens"
    with pytest.raises(ValueError, match="items="):
        item_kind(torch.nn.Linear(2, 2))


def test_bad_items_fail_before_training(tmp_path):
    args = transformers.TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="items must be"):
        Trainer(model=bert_classifier(), args=args, items="words")
    # A model whose loss kind cannot be read off is not refused at construction (as stock).
    Trainer(model=transformers.BertModel(bert_classifier().config), args=args)


class OwnLossConfig(transformers.PretrainedConfig):
    model_type = "own-loss-test"

    def __init__(self, vocab_size=VOCAB, width=16, **kw):
        super().__init__(**kw)
        self.vocab_size, self.width = vocab_size, width


class OwnLossModel(transformers.PreTrainedModel):
    """A custom model with its own loss (a mean over samples) and a name that says nothing."""

    config_class = OwnLossConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = torch.nn.Embedding(config.vocab_size, config.width)
        self.head = torch.nn.Linear(config.width, 3)
        self.post_init()

    def forward(self, input_ids, attention_mask, labels=None, **kwargs):
        mask = attention_mask.unsqueeze(-1).float()
        pooled = (self.emb(input_ids) * mask).sum(1) / mask.sum(1)
        logits = self.head(torch.tanh(pooled))
        loss = torch.nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return transformers.modeling_outputs.SequenceClassifierOutput(loss=loss, logits=logits)


class PlainModule(torch.nn.Module):
    """Not a PreTrainedModel at all: the stock Trainer trains it, so must ours."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 16)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask, labels=None):
        mask = attention_mask.float()
        pooled = (self.emb(input_ids) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        logits = self.head(pooled)
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def own_loss_model(seed=0):
    torch.manual_seed(seed)
    return OwnLossModel(OwnLossConfig())


def plain_module(seed=0):
    torch.manual_seed(seed)
    return PlainModule()


@pytest.mark.parametrize("make", [own_loss_model, plain_module], ids=["custom PreTrainedModel", "nn.Module"])
def test_models_whose_loss_kind_cannot_be_read_train_exactly_by_samples(tmp_path, make):
    data, collate = variable_length_rows(30, causal=False), pad_collator(causal=False)
    start = make()
    big = train(transformers.Trainer, make(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    with pytest.warns(UserWarning, match="weighed by its samples"):
        exact = train(Trainer, make(), data, collate, tmp_path, batch=4, k=3)
    step = moved(big, start)
    assert step > 1e-3
    assert max_diff(exact, big) < 1e-5 * step / 1e-3, max_diff(exact, big)


def test_without_accumulation_it_is_the_stock_trainer_exactly(tmp_path):
    data, collate = variable_length_rows(30, causal=False), pad_collator(causal=False)
    for make in (bert_classifier, own_loss_model):
        ours = train(Trainer, make(), data, collate, tmp_path / "ours", batch=4, k=1)
        stock = train(transformers.Trainer, make(), data, collate, tmp_path / "stock", batch=4, k=1)
        assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), stock.parameters()))


def test_an_evaluation_only_trainer_and_model_init_are_accepted(tmp_path):
    data, collate = variable_length_rows(12, causal=False), pad_collator(causal=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "e"), per_device_eval_batch_size=4, report_to=[],
                                          use_cpu=True, disable_tqdm=True, gradient_accumulation_steps=3)
    assert "eval_loss" in Trainer(model=own_loss_model(), args=args, eval_dataset=data, data_collator=collate).evaluate()
    # model_init: no model at construction; the window's count is taken from the model it makes.
    big = train(transformers.Trainer, own_loss_model(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "init"), per_device_train_batch_size=4, gradient_accumulation_steps=3,
        num_train_epochs=1, learning_rate=5e-3, max_grad_norm=1.0, seed=7, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model_init=lambda: own_loss_model(), args=args, train_dataset=data, data_collator=collate, items="samples")
    trainer.train()
    assert max_diff(trainer.model, big) < 1e-5


def sum_over_count(outputs, labels, num_items_in_batch=None):
    """A user loss written as the Trainer documentation shows: a sum over the window's count."""
    return torch.nn.functional.cross_entropy(outputs["logits"], labels, reduction="sum") / num_items_in_batch


def plain_mean(outputs, labels, num_items_in_batch=None):
    """A user loss that ignores the count: a mean over the micro-batch."""
    return torch.nn.functional.cross_entropy(outputs["logits"], labels)


@pytest.mark.parametrize("loss_func", [sum_over_count, plain_mean], ids=["divides by num_items_in_batch", "mean"])
def test_compute_loss_func_either_way_equals_the_big_batch(tmp_path, loss_func):
    data, collate = variable_length_rows(30, causal=False), pad_collator(causal=False)
    start = bert_classifier()
    big = train(transformers.Trainer, bert_classifier(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "f"), per_device_train_batch_size=4, gradient_accumulation_steps=3,
        num_train_epochs=1, learning_rate=5e-3, max_grad_norm=1.0, seed=7, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    model = bert_classifier()
    Trainer(model=model, args=args, train_dataset=data, data_collator=collate, compute_loss_func=loss_func).train()
    step = moved(big, start)
    assert step > 1e-3
    assert max_diff(model, big) < 1e-5 * step / 1e-3, max_diff(model, big)


def _args(tmp_path, name, batch, k, **kw):
    base = dict(output_dir=str(tmp_path / name), per_device_train_batch_size=batch, gradient_accumulation_steps=k,
                num_train_epochs=2, learning_rate=5e-3, max_grad_norm=1.0, seed=7, report_to=[], save_strategy="no",
                logging_strategy="steps", logging_steps=1, use_cpu=True, dataloader_num_workers=0, disable_tqdm=True,
                include_num_input_tokens_seen="non_padding")
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_logged_loss_steps_epochs_and_tokens_equal_the_big_batch(tmp_path):
    data, collate = variable_length_rows(30, causal=False), pad_collator(causal=False)
    runs = {}
    for name, cls, batch, k in [("big", transformers.Trainer, 12, 1), ("exact", Trainer, 4, 3)]:
        trainer = cls(model=bert_classifier(), args=_args(tmp_path, name, batch, k), train_dataset=data, data_collator=collate)
        if name == "big":
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        runs[name] = trainer.state
    big, exact = runs["big"], runs["exact"]
    assert exact.global_step == big.global_step == 6 and exact.epoch == big.epoch
    assert exact.num_input_tokens_seen == big.num_input_tokens_seen
    losses = {n: [h["loss"] for h in s.log_history if "loss" in h] for n, s in runs.items()}
    assert len(losses["exact"]) == len(losses["big"]) == 6
    assert losses["exact"] == pytest.approx(losses["big"], rel=1e-4)


def test_early_stopping_and_a_resumed_run_match_the_big_batch(tmp_path):
    data, collate = variable_length_rows(30, causal=False), pad_collator(causal=False)
    evals = variable_length_rows(8, causal=False, seed=9)
    stop = dict(eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True,
                metric_for_best_model="loss", greater_is_better=True, num_train_epochs=3)
    final = {}
    for name, cls, batch, k in [("big", transformers.Trainer, 12, 1), ("exact", Trainer, 4, 3)]:
        callback = transformers.EarlyStoppingCallback(early_stopping_patience=1)
        trainer = cls(model=bert_classifier(), args=_args(tmp_path, name, batch, k, **stop), train_dataset=data,
                      eval_dataset=evals, data_collator=collate, callbacks=[callback])
        if name == "big":
            trainer.model_accepts_loss_kwargs = False
        trainer.train()
        final[name] = (trainer.state.global_step, trainer.model)
    # greater_is_better on the loss stops as soon as the loss improves: both stop at the same step.
    assert final["exact"][0] == final["big"][0] < 9
    assert max_diff(final["exact"][1], final["big"][1]) < 1e-5
    # Resume from the checkpoint at step 2 of the accumulated run: the same weights as straight.
    straight = Trainer(model=bert_classifier(), args=_args(tmp_path, "straight", 4, 3, save_strategy="steps", save_steps=2,
                       num_train_epochs=1), train_dataset=data, data_collator=collate)
    straight.train()
    resumed = Trainer(model=bert_classifier(seed=5), args=_args(tmp_path, "straight", 4, 3, num_train_epochs=1),
                      train_dataset=data, data_collator=collate)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    assert max_diff(resumed.model, straight.model) < 1e-6


def _two_terms(model, inputs):
    """A token mean plus 0.3 x the mean over long sequences of their token means (absent where
    a micro-batch has no long sequence)."""
    import torch.nn.functional as F

    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits[:, :-1]
    labels = inputs["labels"][:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB).float(), labels.reshape(-1), reduction="none").reshape(labels.shape)
    valid = (labels != -100).float()
    ce = ce * valid
    terms = {"lm": (ce.sum() / valid.sum(), valid.sum())}
    long = valid.sum(1) >= 12
    if bool(long.any()):
        terms["long"] = (0.3 * (ce.sum(1) / valid.sum(1).clamp(min=1))[long].mean(), int(long.sum()))
    return terms


_COUNTERS = {"lm": lambda b: int((b["labels"][:, 1:] != -100).sum()),
             "long": lambda b: int(((b["labels"][:, 1:] != -100).sum(1) >= 12).sum())}


class _TermsExact(Trainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, terms=_COUNTERS, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return _two_terms(model, inputs)  # a mapping: the mixin weighs each term by its own share


class _TermsBig(transformers.Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return sum(v[0] for v in _two_terms(model, inputs).values())


class _TermsOneWeight(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return sum(v[0] for v in _two_terms(model, inputs).values())


def test_a_compute_loss_returning_terms_equals_the_big_batch(tmp_path):
    data, collate = variable_length_rows(30, causal=True), pad_collator(causal=True)
    start = gpt2_lm()
    big = train(_TermsBig, gpt2_lm(), data, collate, tmp_path, batch=12, k=1)
    exact = train(_TermsExact, gpt2_lm(), data, collate, tmp_path, batch=4, k=3)
    one = train(_TermsOneWeight, gpt2_lm(), data, collate, tmp_path, batch=4, k=3)
    step = moved(big, start)
    assert step > 1e-3
    assert max_diff(exact, big) < 1e-5 * step / 1e-3, max_diff(exact, big)
    assert max_diff(one, big) > 0.02 * step, max_diff(one, big)  # one weight per micro-batch is off
    with pytest.raises(ValueError, match=r"terms=\{name: counter\}"):
        class NoCounters(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                return _two_terms(model, inputs)
        train(NoCounters, gpt2_lm(), data, collate, tmp_path, batch=4, k=3)
