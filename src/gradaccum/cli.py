"""The ``gradaccum`` command: a thin layer that fills :class:`TrainConfig` and runs it."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import typing
from pathlib import Path
from typing import Any, Optional, Sequence


def _parse_optional(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "off") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _int_or_float(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return float(text)


def _int_or_word(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        return text


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from .recipes.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        hint = hints[f.name]
        text = f.metadata["help"]
        # A help text that explains its default says it once.
        kw: dict[str, Any] = {"dest": f.name, "help": text if "default" in text else f"{text} (default: {f.default})"}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        args = typing.get_args(hint)
        if hint is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif hint == typing.Union[int, float]:
            kw["type"] = _int_or_float
        elif hint == typing.Union[int, str]:
            kw["type"] = _int_or_word
        elif type(None) in args:
            inner = next(a for a in args if a is not type(None))
            kw["type"] = _parse_optional(inner)
            if "choices" not in kw:
                kw["metavar"] = inner.__name__.upper()
        else:
            kw["type"] = hint
        if f.metadata.get("metavar"):
            kw["metavar"] = f.metadata["metavar"]
        parser.add_argument(flag, **kw)


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (``gradaccum --help``)."""
    parser = argparse.ArgumentParser(prog="gradaccum", description="Gradient accumulation whose update equals the one big batch's update.")
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "train": ("fine-tune a model with exact accumulation (default: all-MiniLM-L6-v2 on UCI drug reviews)",
                  "Fine-tune a Hugging Face model with exact gradient accumulation, offline. "
                  "With no options: 3-class sentiment of UCI drug reviews with all-MiniLM-L6-v2."),
        "plan": ("measure peak memory and speed at several micro-batch sizes and recommend one",
                 "For the train command's model and data, measure one forward + backward at a few "
                 "micro-batch sizes on the longest examples and recommend the fastest that fits "
                 "--memory-budget (default: the device's free memory)."),
        "verify": ("check that accumulating the train command's model gives the big batch's gradient",
                   "Compare the gradient of one effective batch of the training data with the one "
                   "accumulated over k micro-batches, in train() and eval() mode, and name what differs."),
    }
    for name, (summary, description) in commands.items():
        command = sub.add_parser(name, help=summary, description=description, argument_default=argparse.SUPPRESS)
        command.add_argument("--config", metavar="FILE", help="read options from a TOML or YAML file; flags given here win")
        _add_config_flags(command)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``gradaccum`` console script and of ``python -m gradaccum``.

    A torchrun worker that ran a training job ends its process here, once everything is
    written (:func:`gradaccum.end_rank`): a finished job exits 0 on every rank.

    Example:
        >>> main(["train", "--epochs", "1", "--train-limit", "64"])  # doctest: +SKIP
        0
    """
    code = _main(argv)
    run = sys.modules.get("gradaccum.recipes.run")
    if run is not None and getattr(run, "STARTED", {}).get("process_group"):
        from ._end import end_rank

        end_rank(code)
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        parser = build_parser()
        args = vars(parser.parse_args(argv))
    except KeyboardInterrupt:
        print("gradaccum: interrupted before anything started", file=sys.stderr)
        return 130
    command = args.pop("command")
    body = {"train": _train, "plan": _plan, "verify": _verify}[command]
    from .recipes.config import CheckpointError, ConfigError, read_config_file

    values: dict[str, Any] = dict(args)
    # SIGTERM raised where the process is (outside the training loop, which checkpoints on
    # it), so that the output lock and open files are released and the exit says why.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        from .recipes.config import with_task_defaults

        values = read_config_file(args.pop("config")) if "config" in args else {}
        values.update(args)
        return body(values if values.get("resume") else with_task_defaults(values))
    except ImportError as exc:
        print(f"gradaccum {command}: error: {exc.name} is missing: pip install 'gradaccum[train]'", file=sys.stderr)
    except (ConfigError, CheckpointError) as exc:  # bad input: said before any training starts
        print(f"gradaccum {command}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # outside the training loop (inside it, a checkpoint is written: 130 too)
        print(_interrupted(command, values, "interrupted"), file=sys.stderr)
        return 130
    except _Terminated:
        print(_interrupted(command, values, "stopped by SIGTERM"), file=sys.stderr)
        return 143
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return 2


class _Terminated(BaseException):
    """SIGTERM outside the training loop."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


def _interrupted(command: str, values: dict[str, Any], how: str) -> str:
    """What an interruption outside the training loop leaves: a run with checkpoints to
    continue from, or nothing trained yet."""
    out = Path(str(values.get("resume") or values.get("out") or "runs/train"))
    if command == "train" and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")):
        return (f"gradaccum train: {how} outside the training loop; the run's checkpoints in {out} are kept: "
                f"continue with gradaccum train --resume {out}")
    return f"gradaccum {command}: {how} before training started; nothing was trained"


def _one_process(command: str, values: dict[str, Any]) -> bool:
    """plan and verify measure in one process: under torchrun, rank 0 alone runs (the others
    would compete for the same CPUs and print the same report); --shard changes nothing there."""
    if int(os.environ.get("RANK", "0")) != 0:
        return False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"gradaccum {command}: notice: it runs in one process; rank 0 measures, the other ranks exit",
              file=sys.stderr)
    if values.get("shard", "ddp") != "ddp":
        print(f"gradaccum {command}: notice: --shard has no effect here: {command} runs in one process"
              + ("; the plan lists every --shard mode's memory per rank" if command == "plan" else ""), file=sys.stderr)
    return True


def _plan(values: dict[str, Any]) -> int:
    from .recipes.config import ConfigError, TrainConfig
    from .recipes.plan import parse_bytes, plan

    cfg = TrainConfig(**values)
    if not _one_process("plan", values):
        return 0
    if cfg.task == "retrieval":
        raise ConfigError("gradaccum plan measures the classification and language-model tasks, not --task "
                          "retrieval (a bi-encoder whose window is encoded twice); give its --micro-batch by hand")
    plan(cfg, parse_bytes(cfg.memory_budget) if cfg.memory_budget else None)
    return 0


def _verify(values: dict[str, Any]) -> int:
    from .recipes.check import verify_config
    from .recipes.config import ConfigError, TrainConfig

    cfg = TrainConfig(**values)
    if not _one_process("verify", values):
        return 0
    if cfg.task == "retrieval":
        raise ConfigError("gradaccum verify checks the classification and language-model tasks against their big "
                          "batch, not --task retrieval: its window negatives are checked by the project's tests, "
                          "and --negatives micro-batch is inexact by design")
    reports = verify_config(cfg)
    for mode, r in reports.items():
        verdict = "exact" if r.exact else "NOT exact"
        print(f"{mode}(): {verdict}: max relative error {r.max_rel_error:.2e} over {r.steps} micro-batches (tolerance {r.tolerance:g})")
        for cause in r.causes:
            print(f"  - {cause}")
    return 0 if reports["eval"].exact else 1


def _train(values: dict[str, Any]) -> int:
    from .recipes.config import TrainConfig, ignored_options, resume_config

    # The options are checked before torch is even imported: bad input fails at once.
    given = dict(values)
    if values.get("resume"):
        cfg = resume_config(values.pop("resume"), values)
    else:
        cfg = TrainConfig(**values)
    if int(os.environ.get("RANK", "0")) == 0:
        for note in ignored_options(given, cfg):
            print(f"gradaccum train: notice: {note}", file=sys.stderr)
    from .recipes import run, train

    # One run per output directory; under torchrun, rank 0 holds it for all.
    lock = run.OutputLock(Path(cfg.out)) if int(os.environ.get("RANK", "0")) == 0 else contextlib.nullcontext()
    try:
        with lock:
            if cfg.task == "retrieval":
                from .recipes import retrieval

                summary = retrieval.run(cfg)
            else:
                summary = train.run(cfg)
    except run.Interrupted as exc:
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one message for all ranks
            print(f"gradaccum train: {exc}", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        _print_summary(summary)
    return 0


def _print_summary(s: dict[str, Any]) -> None:
    ev, base = s["eval"], s["baseline"]
    cut = (f"windows cut at {s['max_tokens']} padded tokens" if s.get("max_tokens")
           else f"micro-batch {s['micro_batch']} x k {s['k']}")
    print(f"done: {s['optimizer_steps']} optimizer steps, effective batch {s['effective_batch']} "
          f"({cut}, {s['world_size']} rank(s)), {s['train_seconds']:.0f} s of training")
    if s.get("tokens"):
        t = s["tokens"]
        print(f"tokens: {t['real']} real, {t['padded']} with padding ({t['padded_per_real']:.2f} padded per real)")
    if "mrr" in ev:
        print(f"eval: accuracy@1 {ev['accuracy@1']:.3f}, MRR {ev['mrr']:.3f} over {s['num_conditions']} conditions   "
              f"untuned model: accuracy@1 {base['accuracy@1']:.3f}, MRR {base['mrr']:.3f}")
    elif "accuracy" in ev:
        print(f"eval: accuracy {ev['accuracy']:.3f}, macro-F1 {ev['macro_f1']:.3f}")
        print(f"  majority class ({base['label']}): accuracy {base['accuracy']:.3f}, macro-F1 {base['macro_f1']:.3f}")
        if "tfidf_baseline" in s:
            tf = s["tfidf_baseline"]
            print(f"  TF-IDF + logistic regression: accuracy {tf['accuracy']:.3f}, macro-F1 {tf['macro_f1']:.3f}")
    else:
        print(f"eval: loss {ev['loss']:.3f} (perplexity {ev['perplexity']:.1f})   unigram baseline: loss {base['loss']:.3f}")
    print(f"outputs in {s['config']['out']}: summary.json, metrics.csv, loss.png, checkpoints/")
