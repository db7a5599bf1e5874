"""The model and the tokenised data of a run: one place, used by train, plan and verify."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

import torch

from .._text import short
from . import assets
from .config import ConfigError, TrainConfig, check_model_dir
from .data import Splits, load_splits


@dataclasses.dataclass
class Prepared:
    """The data, tokenizer and model of a run, and the texts tokenised at ``max_length``."""

    splits: Splits
    tok: Any
    model: torch.nn.Module
    max_length: int
    train_ids: list[list[int]]
    eval_ids: list[list[int]]


def prepare(cfg: TrainConfig) -> Prepared:
    """Load the data, build the model and tokenise both splits at the capped max length.

    Example:
        >>> p = prepare(TrainConfig(train_limit=32))  # doctest: +SKIP
        >>> len(p.train_ids), p.max_length  # doctest: +SKIP
        (32, 128)
    """
    splits = load_splits(cfg)
    tok, model = build(cfg, len(splits.labels), splits.labels)
    limit = max_length(cfg, tok, model)

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=limit)["input_ids"]

    return Prepared(splits, tok, model, limit, tokenize(splits.train_texts), tokenize(splits.eval_texts))


def build(cfg: TrainConfig, num_labels: int, labels: list[str]) -> tuple[Any, torch.nn.Module]:
    """The tokenizer and the model of ``cfg`` (a new classification head, or a causal LM).

    Example:
        >>> tok, model = build(TrainConfig(), 3, ["negative", "neutral", "positive"])  # doctest: +SKIP
    """
    import transformers

    transformers.logging.set_verbosity_error()  # the new head's "newly initialized" notice is expected
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(cfg.seed)
    if cfg.task == "lm" and cfg.model is None:
        tok = transformers.AutoTokenizer.from_pretrained(assets.default_model_dir())
        config = transformers.GPT2Config(
            vocab_size=len(tok), n_positions=cfg.max_length, n_embd=128, n_layer=2, n_head=4,
            bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        )
        return tok, transformers.GPT2LMHeadModel(config)
    model_dir = cfg.model or str(assets.default_model_dir())
    tok = load_tokenizer(model_dir)
    model: Any  # a Transformers model (its config is read below)
    try:
        if cfg.task == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
        elif cfg.pooling == "mean":
            encoder = transformers.AutoModel.from_pretrained(model_dir, trust_remote_code=False)
            model = MeanPoolClassifier(encoder, num_labels, labels)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
                trust_remote_code=False,
            )
    except Exception as exc:  # truncated, foreign or pickled weights: say so, no traceback
        raise ConfigError(f"--model {model_dir}: cannot load its weights ({short(str(exc), 300)})") from None
    check_vocabulary(model_dir, tok, model)
    if cfg.task != "lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model


class MeanPoolClassifier(torch.nn.Module):
    """An encoder, the mean of its token states over the attention mask, dropout, a linear head.

    Sentence encoders such as all-MiniLM-L6-v2 were trained to be read this way; their
    [CLS] pooler was not. Returns what a Transformers classifier returns (``loss``,
    ``logits``), so the rest of the recipe does not know the difference.

    Example:
        >>> model = MeanPoolClassifier(AutoModel.from_pretrained(path), 3, ["neg", "neu", "pos"])  # doctest: +SKIP
        >>> model(input_ids=ids, attention_mask=mask, labels=y).loss  # doctest: +SKIP
    """

    def __init__(self, encoder: Any, num_labels: int, labels: list[str]):
        super().__init__()
        self.encoder = encoder
        self.config: Any = encoder.config
        self.config.num_labels = num_labels
        self.config.id2label = dict(enumerate(labels))
        self.config.label2id = {name: i for i, name in enumerate(labels)}
        hidden = self.config.hidden_size
        self.dropout = torch.nn.Dropout(getattr(self.config, "hidden_dropout_prob", 0.1))
        self.classifier = torch.nn.Linear(hidden, num_labels)
        std = getattr(self.config, "initializer_range", 0.02)
        torch.nn.init.normal_(self.classifier.weight, std=std)
        torch.nn.init.zeros_(self.classifier.bias)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: Optional[torch.Tensor] = None,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import SequenceClassifierOutput

        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        logits = self.classifier(self.dropout(pooled))
        loss = None if labels is None else torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def load_tokenizer(model_dir: str) -> Any:
    """The tokenizer of a checked model directory, with a padding token (its end-of-text one
    where it has none); refused with the reason when it cannot serve a batch.

    Example:
        >>> load_tokenizer("models/minilm").pad_token  # doctest: +SKIP
        '[PAD]'
    """
    import transformers

    check_model_dir(model_dir)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(f"--model {model_dir}: cannot load its tokenizer ({short(str(exc), 300)})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"--model {model_dir}: its tokenizer has neither a padding nor an end-of-text token; add a pad_token to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    return tok


def check_vocabulary(model_dir: str, tok: Any, model: torch.nn.Module) -> None:
    """A tokenizer that does not fit the embeddings trains on garbage: refuse it.

    Without its files Transformers builds a tokenizer of a few special tokens, and every
    word becomes the unknown token; with a larger one, ids run past the embedding table.
    """
    rows = typing.cast(Any, model).get_input_embeddings().num_embeddings
    size = len(tok)
    if size > rows:
        raise ConfigError(f"--model {model_dir}: its tokenizer has {size} tokens but the model embeds only {rows}: "
                          "they do not belong together")
    if size < rows // 2:
        raise ConfigError(
            f"--model {model_dir}: its tokenizer has only {size} tokens for an embedding of {rows} rows: the "
            "tokenizer files (tokenizer.json, vocab.txt, vocab.json + merges.txt, ...) are missing or wrong"
        )


def max_length(cfg: TrainConfig, tok: Any, model: torch.nn.Module) -> int:
    """--max-length, capped by what the model's position embeddings and tokenizer allow."""
    limits = [cfg.max_length]
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    if isinstance(getattr(tok, "model_max_length", None), int) and tok.model_max_length < 1_000_000:
        limits.append(tok.model_max_length)
    return min(limits)


