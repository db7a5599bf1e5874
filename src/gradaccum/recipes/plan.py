"""``gradaccum plan``: measure memory and speed per micro-batch size, recommend one.

Peak memory of one forward plus backward is measured at a few micro-batch sizes on the
longest examples of the training data (the worst case of dynamic padding):

- CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``) after a reset.
- CPU: the process's peak resident set (``VmHWM`` in ``/proc/self/status``) minus the
  resident set once the model is loaded. The C allocator keeps freed memory and reuses it,
  so a per-size reset would miss what an earlier size left resident; instead sizes are
  measured smallest first and each reading is the high-water mark so far, an estimate
  that can only err on the high side.

The recommendation is the size with the highest measured throughput among those whose peak
fits the budget: not merely the largest that fits. Then, for 2, 4 and 8 ranks, the first
``--shard`` mode (least communication first) whose model state per rank plus that measured
peak fits too (:func:`shard_bytes`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from .config import ConfigError, TrainConfig, parse_bytes  # noqa: F401 (parse_bytes: part of this module's interface)


@dataclasses.dataclass
class Trial:
    """One measured micro-batch size."""

    micro_batch: int
    peak_bytes: int
    seconds: float
    fits: bool

    @property
    def samples_per_second(self) -> float:
        return self.micro_batch / self.seconds if self.seconds > 0 else 0.0


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(field)


def free_memory(device: torch.device) -> int:
    """Memory free for training on ``device`` now (CUDA: free device memory; CPU: MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise ConfigError("cannot read free memory on this system: give --memory-budget")


def baseline(device: torch.device) -> int:
    """Memory in use before any micro-batch runs (the model, the data)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return _rss_kib("VmRSS") * 1024


def measure(step: Callable[[int], None], size: int, device: torch.device, base: int, repeats: int = 2) -> tuple[int, float]:
    """Peak bytes above ``base`` and median seconds of ``step(size)`` (one forward + backward)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step(size)  # warm-up: lazy allocations and kernels
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _rss_kib("VmHWM") * 1024
    return max(0, peak - base), sorted(times)[len(times) // 2]


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure: CUDA raises ``torch.OutOfMemoryError``, the
    CPU allocator a plain ``RuntimeError`` ("DefaultCPUAllocator: can't allocate memory").

    >>> out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    True
    """
    text = str(exc).lower()
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "out of memory" in text


SHARD_ORDER = ("ddp", "zero1", "zero2", "fsdp2", "zero3")  # least communication first


def shard_bytes(mode: str, params: int, world: int, param_bytes: int = 4) -> int:
    """Model state one rank holds under ``--shard mode`` with AdamW: weights, gradients (as
    ``gradaccum train`` runs each mode) and the optimizer's two fp32 moments.

    ddp holds all three whole; zero1 shards the optimizer; zero2 also the gradients (it
    reduces per micro-batch to keep them sharded); fsdp2 shards weights and optimizer but
    holds the window's unsharded gradient until its one reduction; zero3 shards all three.

    >>> [shard_bytes(m, 1000, 4) for m in ("ddp", "zero1", "zero2", "fsdp2", "zero3")]
    [16000, 10000, 7000, 7000, 4000]
    """
    weights, grads, optim = params * param_bytes, params * 4, params * 8
    shard = {"ddp": (1, 1, 1), "zero1": (1, 1, world), "zero2": (1, world, world),
             "fsdp2": (world, 1, world), "zero3": (world, world, world)}[mode]
    return weights // shard[0] + grads // shard[1] + optim // shard[2]


def recommend(trials: list[Trial], effective_batch: int) -> Optional[Trial]:
    """The fastest fitting trial (ties: the larger micro-batch)."""
    fitting = [t for t in trials if t.fits]
    if not fitting:
        return None
    return max(fitting, key=lambda t: (round(t.samples_per_second, 6), t.micro_batch))


def plan(cfg: TrainConfig, budget: Optional[int] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure candidate micro-batch sizes for ``cfg`` and recommend one (and k).

    Example:
        >>> plan(TrainConfig(effective_batch=32), budget=parse_bytes("6GiB"))["micro_batch"]  # doctest: +SKIP
        8
    """
    from .data import Batcher, resolve_device
    from .model import prepare

    device = resolve_device(cfg.device)
    prep = prepare(cfg)  # the same model and the same capped max length as the run
    model = prep.model.to(device).train()
    ids = prep.train_ids
    longest = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    labels = prep.splits.train_labels or [0] * len(ids)
    batcher = Batcher(ids, labels, prep.tok.pad_token_id, cfg.task)
    budget = budget if budget is not None else free_memory(device)
    E = cfg.effective_batch
    sizes = sorted({min(E, 2**i) for i in range(int(math.log2(E)) + 1)} | {E})

    def step(size: int, index: Optional[list[int]] = None) -> None:
        index = index or [longest[i % len(longest)] for i in range(size)]
        batch = batcher.collate(index)
        batch.pop("num_items")
        out = model(**{k: v.to(device) for k, v in batch.items()})
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        del out

    params = sum(p.numel() for p in model.parameters())
    state = sum(p.numel() * p.element_size() for p in model.parameters()) + params * 4  # weights and their gradient
    if state > budget:
        raise ConfigError(
            f"--memory-budget {budget / 2**20:.0f} MiB is less than the model's own weights and gradient "
            f"({state / 2**20:.0f} MiB), before any activation: no micro-batch can fit. Raise --memory-budget "
            "(or leave it out: the device's free memory), or shard the model over ranks (--shard)")
    trials = []
    base = baseline(device)
    log(f"plan: effective batch {E}, budget {budget / 2**30:.2f} GiB on {device}; measuring on the longest examples")
    for size in sizes:
        try:
            peak, seconds = measure(step, size, device, base)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not out_of_memory(exc):
                raise
            model.zero_grad(set_to_none=True)
            trials.append(Trial(size, -1, math.inf, False))
            log(f"  micro-batch {size:>4}: out of memory")
            break
        trial = Trial(size, peak, seconds, peak <= budget)
        trials.append(trial)
        log(f"  micro-batch {size:>4}: peak {peak / 2**20:9.1f} MiB, {trial.samples_per_second:8.1f} samples/s"
            + ("" if trial.fits else "  (over budget)"))
        if not trial.fits:
            break
    best = recommend(trials, E)
    if best is None:
        raise ConfigError(f"no micro-batch size fits in {budget / 2**20:.0f} MiB, not even {sizes[0]}; "
                          "lower --max-length or raise --memory-budget")
    k = math.ceil(E / best.micro_batch)
    # Memory follows padded tokens: a token budget of the fitting micro-batch at full width
    # fits too, and lets short texts travel many to a micro-batch.
    width = len(ids[longest[0]])
    tokens = best.micro_batch * width
    shortest = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    rows = max(1, min(len(shortest), tokens // max(1, len(ids[shortest[0]]))))
    index = sorted(shortest[:rows], key=lambda i: -len(ids[i]))
    while rows > 1 and rows * len(ids[index[0]]) > tokens:
        rows -= 1
        index = index[1:]
    try:
        short_peak, _ = measure(lambda n: step(n, index), rows, device, base)
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        short_peak = -1
    log(f"recommended: --micro-batch {best.micro_batch} (k = {k}), {best.samples_per_second:.1f} samples/s, "
        f"peak {best.peak_bytes / 2**20:.1f} MiB")
    # The measured peak holds one whole gradient beside the activations: each mode's own
    # gradient share is in shard_bytes instead.
    activations = max(0, best.peak_bytes - params * 4)
    shards = {}
    for world in (2, 4, 8):
        fits = [m for m in SHARD_ORDER if shard_bytes(m, params, world) + activations <= budget]
        shards[world] = fits[0] if fits else None
        log(f"  --shard for {world} ranks: " + ", ".join(
            f"{m} {(shard_bytes(m, params, world) + activations) / 2**20:.0f} MiB" for m in SHARD_ORDER)
            + f" per rank -> {fits[0] if fits else 'none fits: lower --micro-batch or --max-length'}")
    log(f"recommended token budget (--batching tokens): --max-tokens {tokens} ({best.micro_batch} x {width} tokens); "
        + (f"{rows} of the shortest texts under it peak at {short_peak / 2**20:.1f} MiB" if short_peak >= 0
           else f"{rows} of the shortest texts under it ran out of memory: lower --max-tokens"))
    return {"micro_batch": best.micro_batch, "k": k, "max_tokens": tokens, "budget_bytes": budget, "shard": shards,
            "short_rows_peak_bytes": short_peak, "trials": [dataclasses.asdict(t) for t in trials]}
