"""The typed configuration of ``gradaccum train``.

One dataclass, one docstring per field (the ``help`` metadata, shown by ``--help``),
validation in ``__post_init__`` so that a bad value fails before any work starts. The
command line and the optional TOML/YAML file only fill it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from pathlib import Path
from typing import Any, Optional, Union

TASKS = ("sentiment", "condition", "lm")
PRECISIONS = ("fp32", "bf16", "fp16")
LR_RULES = ("none", "linear", "sqrt")
ACCUM_DTYPES = ("float32", "float64")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl")


class ConfigError(ValueError):
    """A bad option: the message names it, says what was wrong and what is accepted."""


def _field(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class TrainConfig:
    """Options of ``gradaccum train``; every field is a ``--flag`` of the same name.

    Example:
        >>> cfg = TrainConfig(effective_batch=32, micro_batch=12)
        >>> cfg.steps_per_window, cfg.micro_batch_sizes
        (3, [12, 12, 8])
    """

    effective_batch: int = _field(16, "samples per optimizer step on each rank; the window is exactly this batch")
    micro_batch: Union[int, str] = _field(4, "samples per forward/backward, or 'auto' (measured by gradaccum plan); k = ceil(effective / micro), the last micro-batch of a window takes the rest")
    memory_budget: Optional[str] = _field(None, "memory for --micro-batch auto and gradaccum plan, e.g. 6GiB (default: what the device has free)")
    epochs: int = _field(5, "passes over the training data")
    max_steps: Optional[int] = _field(None, "stop after this many optimizer steps (also the LR schedule's horizon)")
    lr: float = _field(1e-4, "peak learning rate (AdamW), before --lr-scaling")
    lr_scaling: str = _field("none", "scale --lr from --base-batch to the effective batch", choices=LR_RULES)
    base_batch: int = _field(32, "the batch size --lr was tuned for (used by --lr-scaling)")
    warmup: Union[int, float] = _field(0.1, "linear warmup: a fraction of all steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    max_grad_norm: Optional[float] = _field(1.0, "clip the accumulated gradient to this norm ('none': no clipping)")
    precision: str = _field("fp32", "autocast precision; fp16 adds a GradScaler", choices=PRECISIONS)
    accum_dtype: Optional[str] = _field(None, "sum gradients of lower-precision parameters in this dtype", choices=ACCUM_DTYPES)
    max_length: int = _field(128, "truncate texts to this many tokens")
    task: str = _field("sentiment", "sentiment (3 classes), condition (the most frequent medical conditions) or lm (a small GPT-2 on the review texts)", choices=TASKS)
    num_conditions: int = _field(5, "--task condition: keep this many most frequent conditions")
    model: Optional[str] = _field(None, "a local Hugging Face model directory (default: the shipped all-MiniLM-L6-v2; for lm: a small GPT-2 built from a config)")
    data: Optional[str] = _field(None, "a CSV, TSV or JSONL file to train on instead of the shipped drug reviews (20%% held out for evaluation)")
    text_field: str = _field("text", "--data: the column holding the text")
    label_field: str = _field("label", "--data: the column holding the label")
    out: str = _field("runs/train", "output directory: metrics.csv, summary.json, loss.png, checkpoints")
    seed: int = _field(0, "seed for the model head, data order and dropout")
    save_every: int = _field(50, "write a checkpoint every this many optimizer steps (0: only at the end)")
    resume: Optional[str] = _field(None, "continue the run in this output directory from its last good checkpoint")
    tensorboard: bool = _field(False, "also write TensorBoard events to OUT/tensorboard (needs tensorboard installed)")
    device: str = _field("auto", "cpu, cuda, cuda:N, or auto (cuda when available)")
    train_limit: Optional[int] = _field(None, "use only the first N training examples (smoke tests)")
    eval_limit: Optional[int] = _field(None, "evaluate on only the first N evaluation examples")

    def __post_init__(self) -> None:
        _positive_int(self, "effective_batch", "epochs", "base_batch", "max_length", "num_conditions")
        if self.micro_batch != "auto":
            _positive_int(self, "micro_batch")
        _optional_positive_int(self, "max_steps", "train_limit", "eval_limit")
        if self.memory_budget is not None:
            from .plan import parse_bytes

            parse_bytes(self.memory_budget)
        if self.micro_batch != "auto" and self.effective_batch < self.micro_batch:
            raise ConfigError(
                f"--effective-batch ({self.effective_batch}) is smaller than --micro-batch ({self.micro_batch}): "
                "the effective batch is what one optimizer step sees; raise it or lower --micro-batch"
            )
        _positive_number(self, "lr")
        if self.max_grad_norm is not None:
            _positive_number(self, "max_grad_norm")
        for name in ("weight_decay", "warmup"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"{_flag(name)} must be a number >= 0; got {value!r}")
        if isinstance(self.warmup, float) and self.warmup >= 1 and not self.warmup.is_integer():
            raise ConfigError(f"--warmup must be a fraction < 1 or a whole number of steps; got {self.warmup!r}")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise ConfigError(f"--save-every must be an int >= 0 (0: only at the end); got {self.save_every!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"--seed must be an int; got {self.seed!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got {value!r}")
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(f"--tensorboard must be true or false; got {self.tensorboard!r}")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {self.device!r}")
        if self.data is not None:
            path = Path(self.data)
            if not path.is_file():
                raise ConfigError(f"--data {self.data}: no such file")
            if path.suffix.lower() not in DATA_SUFFIXES:
                raise ConfigError(f"--data {self.data}: the file must end in {', '.join(DATA_SUFFIXES)}")
        if self.model is not None:
            check_model_dir(self.model)

    @property
    def steps_per_window(self) -> int:
        """k: micro-batches per optimizer step."""
        if not isinstance(self.micro_batch, int):
            raise ConfigError("--micro-batch auto must be resolved (gradaccum plan) before k is known")
        return math.ceil(self.effective_batch / self.micro_batch)

    @property
    def micro_batch_sizes(self) -> list[int]:
        """Sizes of one full window's micro-batches; they add up to the effective batch."""
        k = self.steps_per_window
        return [self.micro_batch] * (k - 1) + [self.effective_batch - self.micro_batch * (k - 1)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every option (``resume`` left out: it is not part of the run)."""
        d = dataclasses.asdict(self)
        d.pop("resume")
        return d


def check_model_dir(path: str) -> None:
    """Fail unless ``path`` is a local Hugging Face model directory with weights."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--model {path}: no such directory (give a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json in it; is this a Hugging Face model directory?")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"--model {path}: no weights in it (model.safetensors or pytorch_model.bin)")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{_flag(name)} must be an int >= 1; got {value!r}")


def _optional_positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is not None:
            _positive_int(cfg, name)


def _positive_number(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{_flag(name)} must be a number > 0; got {value!r}")


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a TOML or YAML file; keys are field names (dashes or underscores).

    Example:
        >>> read_config_file("train.toml")  # doctest: +SKIP
        {'effective_batch': 64, 'micro_batch': 16}
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ModuleNotFoundError:
                raise ConfigError(f"--config {path}: reading YAML needs PyYAML (pip install pyyaml), or use TOML") from None
            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml or .yml file")
    except ConfigError:
        raise
    except Exception as exc:  # the parsers' own errors say where the file is wrong
        raise ConfigError(f"--config {path}: cannot parse it: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a table of options at the top level")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}")
        out[name] = value
    return out
