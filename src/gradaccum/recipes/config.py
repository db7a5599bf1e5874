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
import re
import typing
from typing import Any, Optional, Union

from .._text import short

TASKS = ("sentiment", "condition", "lm", "retrieval")
NEGATIVES = ("window", "micro-batch")
BATCHING = ("tokens", "samples")
CLASS_WEIGHTS = ("none", "sqrt", "balanced")
POOLING = ("mean", "head")
# Defaults that differ by task; a value given on the command line or in --config wins.
# The global defaults are tuned for the sentiment job; the other tasks keep what they were run with.
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "retrieval": {"effective_batch": 64, "micro_batch": 8, "lr": 5e-5, "epochs": 2},
    "condition": {"lr": 1e-4, "class_weights": "sqrt", "label_smoothing": 0.0},
    "lm": {"lr": 1e-4},
}
PRECISIONS = ("fp32", "bf16", "fp16")
SHARDS = ("ddp", "fsdp2", "hsdp", "zero1", "zero2", "zero3")
LR_RULES = ("none", "linear", "sqrt")
ACCUM_DTYPES = ("float32", "float64")
DATA_SUFFIXES = (".csv", ".tsv", ".jsonl")
MAX_EFFECTIVE_BATCH = 1_000_000  # per rank; far beyond any dataset this command reads
MAX_SEED = 2**63 - 1
MIN_LENGTH = 4  # two special tokens and two of text
DEVICE = re.compile(r"auto|cpu|cuda(:\d{1,3})?")


class ConfigError(ValueError):
    """A bad option: the message names it, says what was wrong and what is accepted."""


class CheckpointError(RuntimeError):
    """No usable checkpoint (or none can be written); the message says why and what to do."""


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
    micro_batch: Union[int, str] = _field(8, "samples per forward/backward, or 'auto' (measured by gradaccum plan); k = ceil(effective / micro), the last micro-batch of a window takes the rest")
    batching: str = _field("tokens", "tokens: sort each window by length and cut it into micro-batches of at most --max-tokens padded tokens (less padding, same update); samples: micro-batches of --micro-batch in shuffled order", choices=BATCHING)
    max_tokens: Optional[int] = _field(None, "--batching tokens: padded tokens per micro-batch (default: micro-batch x max length, the peak of a micro-batch of the longest texts)")
    memory_budget: Optional[str] = _field(None, "memory for --micro-batch auto and gradaccum plan, e.g. 6GiB (default: what the device has free)", metavar="SIZE")
    epochs: int = _field(5, "passes over the training data")
    max_steps: Optional[int] = _field(None, "stop after this many optimizer steps (also the LR schedule's horizon)")
    lr: float = _field(5e-5, "peak learning rate (AdamW), before --lr-scaling")
    lr_scaling: str = _field("none", "scale --lr from --base-batch to the effective batch", choices=LR_RULES)
    base_batch: int = _field(32, "the batch size --lr was tuned for (used by --lr-scaling)")
    warmup: Union[int, float] = _field(0.1, "linear warmup: a fraction of all steps (< 1) or a number of steps (>= 1)")
    weight_decay: float = _field(0.01, "AdamW weight decay")
    label_smoothing: float = _field(0.1, "classification: cross-entropy label smoothing, 0 to < 1 (per example, so still exact)")
    class_weights: str = _field("balanced", "classification: weigh each example's loss by its class, balanced n/(C n_c) or its square root (still exact: a micro-batch's items are the sum of its weights)", choices=CLASS_WEIGHTS)
    max_grad_norm: Optional[float] = _field(1.0, "clip the accumulated gradient to this norm ('none': no clipping)")
    precision: str = _field("fp32", "autocast precision; fp16 adds a GradScaler", choices=PRECISIONS)
    accum_dtype: Optional[str] = _field(None, "sum gradients of lower-precision parameters in this dtype", choices=ACCUM_DTYPES)
    max_length: int = _field(256, "truncate texts to this many tokens")
    task: str = _field("sentiment", "sentiment (3 classes), condition (the most frequent medical conditions), lm (a small GPT-2 on the review texts) or retrieval (a bi-encoder: review -> its condition, in-batch negatives; unless given: effective batch 64, micro-batch 8, lr 5e-5, 2 epochs)", choices=TASKS)
    negatives: str = _field("window", "--task retrieval: in-batch negatives from the whole window (exact, through window.encode) or from each micro-batch only (plain accumulation, for comparison)", choices=NEGATIVES)
    pooling: str = _field("mean", "classification: mean of the encoder's token states and a new linear layer, or head: the model's own sequence-classification head (its [CLS] pooler for BERT)", choices=POOLING)
    num_conditions: int = _field(5, "--task condition: keep this many most frequent conditions")
    model: Optional[str] = _field(None, "a local Hugging Face model directory (default: the shipped all-MiniLM-L6-v2; for lm: a small GPT-2 built from a config)", metavar="DIR")
    data: Optional[str] = _field(None, "a CSV, TSV or JSONL file to train on instead of the shipped drug reviews (20%% held out for evaluation)", metavar="FILE")
    text_field: str = _field("text", "--data: the column holding the text")
    label_field: str = _field("label", "--data: the column holding the label")
    out: str = _field("runs/train", "output directory: metrics.csv, summary.json, loss.png, checkpoints", metavar="DIR")
    seed: int = _field(0, "seed for the model head, data order and dropout")
    save_every: int = _field(50, "write a checkpoint every this many optimizer steps (0: only at the end)")
    resume: Optional[str] = _field(None, "continue the run in this output directory from its last good checkpoint", metavar="DIR")
    tensorboard: bool = _field(False, "also write TensorBoard events to OUT/tensorboard (needs tensorboard installed)")
    device: str = _field("auto", "cpu, cuda, cuda:N, or auto (cuda when available)", metavar="DEVICE")
    data_changed: bool = _field(False, "--resume: go on although the --data file changed since the run's last checkpoint (its rows, split and order then differ from the run's)")
    shard: str = _field("ddp", "under torchrun: ddp (a whole model on every rank), fsdp2 (fully_shard: weights, gradients and optimizer state sharded), hsdp (fsdp2 within each of --replicas groups of ranks, replicated across them), zero1, zero2 or zero3 (DeepSpeed ZeRO; needs gradaccum[deepspeed]); gradaccum plan says which fits a memory budget", choices=SHARDS)
    replicas: Optional[int] = _field(None, "--shard hsdp: how many groups the ranks form, each holding one sharded copy of the model (it must divide the ranks; default: one per node, WORLD_SIZE / LOCAL_WORLD_SIZE)")
    train_limit: Optional[int] = _field(None, "use only the first N training examples (smoke tests)")
    eval_limit: Optional[int] = _field(None, "evaluate on only the first N evaluation examples")

    def __post_init__(self) -> None:
        _check_types(self)
        _positive_int(self, "effective_batch", "epochs", "base_batch", "max_length", "num_conditions")
        if self.max_length < MIN_LENGTH:
            raise ConfigError(
                f"--max-length {self.max_length} is below {MIN_LENGTH} tokens: the tokenizer keeps its two special "
                "tokens ([CLS] and [SEP]) whatever the limit, and a text needs at least two more to learn from"
            )
        if self.effective_batch > MAX_EFFECTIVE_BATCH:
            raise ConfigError(
                f"--effective-batch {self.effective_batch} is more than {MAX_EFFECTIVE_BATCH:,} samples per step: "
                "give the number of samples one optimizer step should see"
            )
        if self.micro_batch != "auto":
            _positive_int(self, "micro_batch")
        _optional_positive_int(self, "max_steps", "train_limit", "eval_limit", "max_tokens", "replicas")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget)
        if isinstance(self.micro_batch, int) and self.effective_batch < self.micro_batch:
            raise ConfigError(
                f"--effective-batch ({self.effective_batch}) is smaller than --micro-batch ({self.micro_batch}): "
                "the effective batch is what one optimizer step sees; raise it or lower --micro-batch"
            )
        _positive_number(self, "lr")
        if self.max_grad_norm is not None:
            _positive_number(self, "max_grad_norm")
        if not _is_number(self.label_smoothing) or not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing must be a number from 0 to below 1; got {short(self.label_smoothing)}")
        for name in ("weight_decay", "warmup"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ConfigError(f"{_flag(name)} must be a number >= 0; got {short(value)}")
        if isinstance(self.warmup, float) and self.warmup >= 1 and not self.warmup.is_integer():
            raise ConfigError(f"--warmup must be a fraction < 1 or a whole number of steps; got {short(self.warmup)}")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise ConfigError(f"--save-every must be an int >= 0 (0: only at the end); got {short(self.save_every)}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"--seed must be an int from 0 to 2**63 - 1; got {short(self.seed)}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ConfigError(f"{_flag(f.name)} must be one of {', '.join(choices)}; got {short(value)}")
        for name in ("tensorboard", "data_changed"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{_flag(name)} must be true or false; got {short(getattr(self, name))}")
        if not DEVICE.fullmatch(self.device):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N; got {short(self.device)}")
        if self.data is not None:
            path = Path(self.data)
            if path.is_dir():
                raise ConfigError(f"--data {self.data}: a directory, not a file; give the CSV, TSV or JSONL file in it")
            if path.exists() and not path.is_file():
                raise ConfigError(f"--data {self.data}: not a regular file (a pipe or a device); copy the data into "
                                  "a file and give that")
            if not path.is_file():
                raise ConfigError(f"--data {self.data}: no such file")
            if path.suffix.lower() not in DATA_SUFFIXES:
                raise ConfigError(f"--data {self.data}: the file must end in {', '.join(DATA_SUFFIXES)}")
        if self.model is not None:
            check_model_dir(self.model)
        _check_shard(self)

    @property
    def steps_per_window(self) -> int:
        """k: micro-batches per optimizer step."""
        if not isinstance(self.micro_batch, int):
            raise ConfigError("--micro-batch auto must be resolved (gradaccum plan) before k is known")
        return math.ceil(self.effective_batch / self.micro_batch)

    @property
    def micro_batch_sizes(self) -> list[int]:
        """Sizes of one full window's micro-batches; they add up to the effective batch."""
        k, m = self.steps_per_window, typing.cast(int, self.micro_batch)  # an int: steps_per_window checked it
        return [m] * (k - 1) + [self.effective_batch - m * (k - 1)]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every option (``resume`` left out: it is not part of the run)."""
        d = dataclasses.asdict(self)
        d.pop("resume")
        return d


RESUMABLE_OVERRIDES = ("epochs", "max_steps", "save_every", "tensorboard", "device", "eval_limit", "data_changed")


def resume_config(cfg_dir: str, overrides: dict[str, Any]) -> TrainConfig:
    """The saved configuration of the run in ``cfg_dir``, with the few options a resume may change."""
    if not isinstance(cfg_dir, str):
        raise ConfigError(f"--resume must be text (a run's output directory); got {short(cfg_dir)}")
    path = Path(cfg_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {cfg_dir}: no config.json there; is it the --out of an earlier run?")
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"--resume {cfg_dir}: its config.json is damaged ({short(str(exc), 120)}); "
                          "restore it, or start a new run with another --out") from None
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    if not isinstance(saved, dict) or set(saved) - fields:
        unknown = sorted(map(str, set(saved) - fields)) if isinstance(saved, dict) else "not a table"
        raise ConfigError(f"--resume {cfg_dir}: its config.json is not one this version wrote (unknown: {short(unknown)})")
    if "out" in overrides and Path(overrides["out"]).resolve() != Path(cfg_dir).resolve():
        raise ConfigError(
            f"--out {short(overrides['out'])} with --resume {cfg_dir}: a resumed run continues in its own directory; "
            "leave --out out (or give the same directory)"
        )
    for name, value in overrides.items():
        if name in ("resume", "out"):
            continue
        if name not in RESUMABLE_OVERRIDES and saved.get(name) != value:
            raise ConfigError(
                f"--{name.replace('_', '-')} cannot change on --resume (the run used {short(saved.get(name))}); "
                f"only {', '.join('--' + n.replace('_', '-') for n in RESUMABLE_OVERRIDES)} can"
            )
        saved[name] = value
    saved["out"] = str(cfg_dir)
    return TrainConfig(**saved, resume=str(cfg_dir))


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1024, "m": 1e6, "mb": 1e6, "mib": 1024**2,
          "g": 1e9, "gb": 1e9, "gib": 1024**3, "t": 1e12, "tb": 1e12, "tib": 1024**4}


def parse_bytes(text: str) -> int:
    """``"6GiB"`` -> 6442450944.

    >>> parse_bytes("512MiB")
    536870912
    """
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?|\.\d+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise ConfigError(f"--memory-budget {short(text)}: give a size such as 6GiB, 512MiB or 8GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def with_task_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the task's own defaults filled in where no value was given, and a
    default micro-batch no larger than a smaller ``effective_batch`` that was given.

    >>> with_task_defaults({"task": "retrieval", "epochs": 1})["micro_batch"]
    8
    >>> with_task_defaults({"effective_batch": 4})["micro_batch"]
    4
    """
    task = values.get("task")
    defaults: dict[str, Any] = dict(TASK_DEFAULTS.get(task, {})) if isinstance(task, str) else {}
    effective = values.get("effective_batch", defaults.get("effective_batch"))
    micro = defaults.get("micro_batch", TrainConfig.__dataclass_fields__["micro_batch"].default)
    if "micro_batch" not in values and isinstance(effective, int) and not isinstance(effective, bool) and 0 < effective < micro:
        defaults["micro_batch"] = effective
    return {**defaults, **values}


def check_model_dir(path: str) -> None:
    """Fail unless ``path`` is a local Hugging Face model directory with weights and no code."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"--model {path}: no such directory (give a local Hugging Face model directory)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model {path}: no config.json in it; is this a Hugging Face model directory?")
    weights = list(p.glob("*.safetensors")) + list(p.glob("pytorch_model*.bin"))
    if not weights:
        raise ConfigError(f"--model {path}: no weights in it (model.safetensors or pytorch_model.bin)")
    for name in ("config.json", "tokenizer_config.json"):
        if not (p / name).is_file():
            continue
        try:
            settings = json.loads((p / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"--model {path}: {name} is not readable JSON ({short(str(exc), 120)})") from None
        # Code shipped with a model would run on load: this command never runs it.
        if isinstance(settings, dict) and "auto_map" in settings:
            raise ConfigError(
                f"--model {path}: {name} asks to run the directory's own Python code (auto_map); gradaccum "
                "never runs code from a model directory. Use a model of a built-in Transformers architecture"
            )


def _check_shard(cfg: TrainConfig) -> None:
    """What a sharded layout cannot do, refused before any work."""
    if cfg.replicas is not None and cfg.shard != "hsdp":
        raise ConfigError(f"--replicas with --shard {cfg.shard}: only --shard hsdp holds several sharded copies of the "
                          "model; use --shard hsdp, or leave --replicas out")
    if cfg.shard == "ddp":
        return
    if cfg.task == "retrieval":
        raise ConfigError(f"--task retrieval with --shard {cfg.shard}: its window-wide negatives re-encode each "
                          "micro-batch without sync, which needs a whole model on every rank; use --shard ddp")
    if cfg.accum_dtype is not None:
        raise ConfigError(f"--accum-dtype with --shard {cfg.shard}: the sharded engine holds the gradients itself; "
                          "leave --accum-dtype out")
    if cfg.shard.startswith("zero") and cfg.precision == "fp16":
        raise ConfigError(f"--precision fp16 with --shard {cfg.shard}: DeepSpeed's fp16 loss scale is where the "
                          "window's scale goes; use --precision bf16 (DeepSpeed's bf16) or fp32")


def _check_types(cfg: TrainConfig) -> None:
    """Every text option is text: a config file can put a number or a list anywhere."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(cfg):
        value, hint = getattr(cfg, f.name), hints[f.name]
        if hint is str or hint == Optional[str]:
            if not (isinstance(value, str) or (value is None and hint is not str)):
                raise ConfigError(f"{_flag(f.name)} must be text; got {short(value)} ({type(value).__name__})")
        elif hint == Union[int, str] and not (value == "auto" or (isinstance(value, int) and not isinstance(value, bool))):
            raise ConfigError(f"{_flag(f.name)} must be a whole number or 'auto'; got {short(value)}")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{_flag(name)} must be an int >= 1; got {short(value)}")


def _optional_positive_int(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        if getattr(cfg, name) is not None:
            _positive_int(cfg, name)


def _positive_number(cfg: TrainConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not _is_number(value) or value <= 0:
        raise ConfigError(f"{_flag(name)} must be a number > 0; got {short(value)}{_text_hint(value)}")


def _text_hint(value: Any) -> str:
    """Why a number arrived as text: YAML 1.1 reads 5e-5 (no dot) as a string."""
    try:
        float(value) if isinstance(value, str) else None
    except ValueError:
        return ""
    return (" (text, not a number: YAML reads 5e-5 without a dot as text; write 5.0e-5 in the config file)"
            if isinstance(value, str) else "")


def ignored_options(given: dict[str, Any], cfg: TrainConfig) -> list[str]:
    """One-line notices for options given that have no effect on this run.

    >>> ignored_options({"pooling": "head"}, TrainConfig(task="retrieval"))
    ['--pooling has no effect with --task retrieval (a bi-encoder: mean pooling, InfoNCE loss)']
    """
    notes = []
    if cfg.task == "retrieval":
        for name in ("batching", "max_tokens", "pooling", "class_weights", "label_smoothing"):
            if name in given:
                notes.append(f"{_flag(name)} has no effect with --task retrieval (a bi-encoder: mean pooling, "
                             "InfoNCE loss)")
    elif "max_tokens" in given and cfg.batching == "samples":
        notes.append("--max-tokens has no effect with --batching samples (micro-batches of --micro-batch samples)")
    if cfg.task == "lm":
        for name in ("class_weights", "label_smoothing", "pooling"):
            if name in given:
                notes.append(f"{_flag(name)} has no effect with --task lm (a language model: no classes)")
    return notes


def read_config_file(path: str) -> dict[str, Any]:
    """Options from a TOML or YAML file; keys are field names (dashes or underscores).

    Example:
        >>> read_config_file("train.toml")  # doctest: +SKIP
        {'effective_batch': 64, 'micro_batch': 16}
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--config {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"--config {path}: cannot read it ({exc.strerror or exc})") from None
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
        raise ConfigError(f"--config {path}: cannot parse it: {short(str(exc), 300)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: expected a table of options at the top level")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {short(key)}")
        out[name] = value
    return out
