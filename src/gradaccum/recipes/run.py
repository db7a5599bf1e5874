"""What every ``gradaccum train`` task does around its training loop, written once.

The output directory and its lock, the optional dependencies, the process group under
torchrun, stop requests on SIGINT/SIGTERM (agreed by every rank at a window boundary),
checkpoints staged by every rank and committed by rank 0, a resume that every rank takes
from the same checkpoint, the data file's fingerprint and the peak memory. The tasks
(``train.py``: classification and language modelling; ``retrieval.py``) build their model,
data and loop on top and pass their own evaluation in where the scaffold needs one.
"""

from __future__ import annotations

import contextlib
import os
import random
import resource
import shutil
import signal
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from .._text import short
from ..engine import Accumulator
from . import checkpoint, shard
from .config import ConfigError, TrainConfig
from .data import resolve_device


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


def prepare_out(cfg: TrainConfig, log: Callable[[str], None] = print) -> Path:
    """``--out``, writable, with a finished run there replaced and an unfinished one refused."""
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


def resume_command(out: Path, world: int) -> str:
    """The command that continues the run in ``out`` (under torchrun with as many processes)."""
    if world > 1:
        return f"torchrun --nproc-per-node {world} -m gradaccum train --resume {out}"
    return f"gradaccum train --resume {out}"


class Interrupted(Exception):
    """Training stopped on a signal after writing a checkpoint."""


class StopRequest:
    """SIGINT/SIGTERM during training: note it, and stop where a checkpoint can be written.

    In one process that is after the current micro-batch (the accumulator saves the partial
    window). Under torchrun every rank must write its share of the same checkpoint, so the
    ranks agree at each window boundary, in one tiny all-reduce, whether any rank was asked
    to stop (torchrun forwards the signal to every worker, and kills them 30 s later).
    """

    def __init__(self, world: int = 1, group: Any = None) -> None:
        self.signal: Optional[int] = None
        self.world, self.group = world, group
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def now(self) -> bool:
        """One process: stop after this micro-batch."""
        return self.world == 1 and self.signal is not None

    def agreed(self) -> bool:
        """At a window boundary (every rank calls it): whether any rank was asked to stop."""
        if self.world == 1:
            return self.signal is not None
        flag = torch.tensor([0.0 if self.signal is None else float(self.signal)])
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
        if flag.item() and self.signal is None:
            self.signal = int(flag.item())  # another rank's: this one stops with it
        return bool(flag.item())

    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else "a signal"

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def terminable() -> Iterator[None]:
    """SIGTERM ends the process at once while it may wait inside a collective (where a Python
    handler cannot run): when torchrun stops the job because another rank refused its input,
    this rank ends with it instead of 30 s later."""
    try:
        old = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


STARTED = {"process_group": False}  # whether this process set up a process group (then the CLI ends it, see _end.py)


def init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, Any]:
    """Rank, world size, device and a CPU group for control messages; under torchrun, also
    the process group (gloo on CPU, NCCL on GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(cfg.device)
    if world == 1:
        return 0, 1, device, None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    with terminable():
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
            STARTED["process_group"] = True
        control = torch.distributed.new_group(backend="gloo") if device.type == "cuda" else None
    return torch.distributed.get_rank(), world, device, control


def end_distributed(world: int) -> None:
    """After everything is written: every rank leaves the process group together."""
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every rank."""
    if world > 1:
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        value = box[0]
    return value


def quiet(message: str) -> None:
    """Log sink of ranks other than 0."""


def rng_state() -> dict[str, Any]:
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
             "progress": progress, "rng": rng_state(), "world_size": world, "shard": layout.name}
    if world == 1:
        return checkpoint.save(out, step, core, state, weights=weights)
    token = from_rank0(os.getpid(), world)  # one staging directory for all ranks
    staged = checkpoint.staging(out, step, token)
    if rank == 0:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
    torch.distributed.barrier()
    torch.save({"consumed": progress["consumed"], "rng": rng_state(), "accumulator": acc.state_dict()},
               staged / f"rank-{rank}.pt")
    layout.save_ranks(staged)
    torch.distributed.barrier()  # every share is on disk before rank 0 checksums and commits
    path = checkpoint.save(out, step, core, state, weights=weights, staged=staged) if rank == 0 else None
    torch.distributed.barrier()
    return path


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


def _check_run(out: Path, state: dict[str, Any], world: int, layout: shard.Layout) -> None:
    saved_world = state.get("world_size", 1)
    if saved_world != world:
        raise ConfigError(
            f"--resume {out}: the run was trained on {saved_world} rank(s) and is resumed on {world}; "
            f"the global batch and each rank's share of the data would change. Resume it with "
            f"{saved_world} process(es) (torchrun --nproc-per-node {saved_world})"
        )
    saved_shard = state.get("shard", "ddp")
    if saved_shard != layout.name:
        raise ConfigError(
            f"--resume {out}: the checkpoint was written with --shard {saved_shard}, and this run asks for --shard "
            f"{layout.name} (its config.json was edited, or --shard given): the weights and optimizer are laid out "
            f"per mode. Resume with --shard {saved_shard}"
        )


def restore(out: Path, core: torch.nn.Module, optimizer: Any, scheduler: Any, acc: Accumulator,
            log: Callable[[str], None], *, rank: int = 0, world: int = 1, group: Any = None,
            layout: Optional[shard.Layout] = None, cfg: Optional[TrainConfig] = None) -> dict[str, Any]:
    """Load the newest checkpoint that loads whole on every rank; fall back past any that does
    not (another model's shapes, a foreign or damaged state, a rank's file missing) to the
    previous one, all ranks together. Each rank takes its own position in the data, RNG
    state and accumulator from its ``rank-R.pt``."""
    layout = layout or shard.Layout()
    try:
        found: Any = [p.name for p in checkpoint.candidates(out)]
    except checkpoint.CheckpointError as exc:
        found = str(exc)
    found = from_rank0(found, world)  # every rank walks rank 0's list: the same order
    if isinstance(found, str):
        raise checkpoint.CheckpointError(found)
    names: list[str] = found
    reasons = []
    for name in names:
        path = out / "checkpoints" / name
        failure = None
        try:
            state = checkpoint.load(path)
            _check_run(out, state, world, layout)
            own = checkpoint.load_rank(path, rank) if world > 1 else None
            if world > 1 and own is None:
                raise ValueError(f"its rank-{rank}.pt is missing (a partial copy?)")
            progress = state["progress"]
            if not isinstance(progress, dict) or {"epoch", "consumed", "train_seconds", "evals"} - set(progress):
                raise ValueError("its progress record is incomplete")
            _check_data(cfg, progress)
        except ConfigError:
            raise
        except Exception as exc:  # anything a damaged or foreign checkpoint can raise
            failure = f"{type(exc).__name__}: {short(str(exc), 200)}"
        # Every rank must take the same checkpoint, or their collectives pair with another step's.
        failure = _first_failure(failure, rank, world, group)
        if failure is None:
            try:
                layout.load(path, core, optimizer, state, checkpoint.load_weights)  # collective for sharded layouts
                scheduler.load_state_dict(state["scheduler"])
                acc.load_state_dict((own or state)["accumulator"])
            except Exception as exc:
                failure = f"{type(exc).__name__}: {short(str(exc), 200)}"
            failure = _first_failure(failure, rank, world, group)
        if failure is not None:
            reasons.append(f"{name}: {failure}")
            if rank == 0:  # the ranks agree on the failure: one line says it
                print(f"gradaccum: checkpoint {name} cannot be loaded ({failure}); trying the previous one", file=sys.stderr)
            continue
        rng = (own or state)["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if own is not None:
            progress = {**progress, "consumed": own["consumed"]}
        log(f"resuming from {path} (optimizer step {acc.state.optimizer_step})")
        return progress
    raise checkpoint.CheckpointError(f"no checkpoint in {out} can be loaded: {'; '.join(reasons)}")


def _first_failure(failure: Optional[str], rank: int, world: int, group: Any) -> Optional[str]:
    """The lowest rank's failure, the same on every rank (None: every rank succeeded)."""
    if world == 1:
        return failure
    failures: list[Any] = [None] * world
    torch.distributed.all_gather_object(failures, failure, group=group)
    for r, f in enumerate(failures):
        if f is not None:
            return f if r == rank else f"rank {r}: {f}"
    return None


def peak_memory(device: torch.device) -> dict[str, Any]:
    """The run's peak memory, and how it was measured."""
    if device.type == "cuda":
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(device), "peak_memory_kind": "cuda allocator"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB
    return {"peak_memory_bytes": rss * scale, "peak_memory_kind": "process peak RSS"}
