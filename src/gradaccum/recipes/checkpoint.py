"""Atomic, verified checkpoints: a run can always resume from its last good one.

Each checkpoint is a directory ``OUT/checkpoints/step-NNNNNNN`` with the model weights
(safetensors), the training state (optimizer, scheduler, accumulator, RNG, progress) and
a manifest of SHA-256 sums written last. It is assembled under a temporary name and
renamed into place, so a crash mid-write leaves no directory that looks complete; a file
damaged later fails its checksum, and loading falls back to the previous checkpoint.
Saving a step again (a resumed run's end) moves the old directory aside before the new one
takes its name, and :func:`recover` puts back whichever whole one a crash left behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .config import CheckpointError

KEEP = 2
MANIFEST = "manifest.json"
FILES = ("model.safetensors", "state.pt")




def sha256(path: Path) -> str:
    """The file's SHA-256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def staging(out: Path, step: int, token: int) -> Path:
    """The temporary directory where every rank writes its share of ``step``'s checkpoint
    before rank 0 completes it with :func:`save` (``token``: the same on every rank)."""
    return out / "checkpoints" / f".tmp-step-{step:07d}-{token}"


def save(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any], *,
         weights: Optional[dict[str, torch.Tensor]] = None, staged: Optional[Path] = None) -> Path:
    """Write a checkpoint for ``step`` and drop all but the newest ``KEEP``.

    ``weights``: the whole weights when ``model`` holds only a shard of them; ``staged``: the
    :func:`staging` directory the ranks already wrote their files into (every file found
    there is checksummed with the rest).

    Example:
        >>> save(Path("runs/train"), 40, model, {"optimizer": opt.state_dict()})  # doctest: +SKIP
    """
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = staged if staged is not None else root / f".tmp-{final.name}-{os.getpid()}"
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(tmp, step, model, state, weights)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if _disk_full(exc):
            need = _bytes_needed(model, state) / 2**20
            raise CheckpointError(
                f"no space left on device for a checkpoint in {root}: about {need:.0f} MiB needed; free some "
                f"space, then continue with: gradaccum train --resume {out}"
            ) from None
        raise
    if final.exists():  # the same step saved again (a resumed run's end): replace it
        aside = root / f".old-{final.name}-{os.getpid()}"
        os.rename(final, aside)  # a crash from here on leaves two whole copies: recover() keeps one
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp: Path, step: int, model: torch.nn.Module, state: dict[str, Any],
           weights: Optional[dict[str, torch.Tensor]]) -> None:
    from safetensors.torch import save_file, save_model

    tmp.mkdir(exist_ok=True)
    if weights is None:
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (GPT-2's head)
    else:  # gathered from shards: tied weights are stored once each way, as loaded back
        save_file(_unshared(weights), str(tmp / "model.safetensors"))
    torch.save(state, tmp / "state.pt")
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    sums = {f.relative_to(tmp).as_posix(): sha256(f) for f in files}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": sums}))
    for f in files + [tmp / MANIFEST]:
        with f.open("rb") as fh:
            os.fsync(fh.fileno())


def _unshared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each with its own memory: a gather over shards of one rank (HSDP's
    replicas of one shard each) hands back a tied weight's two names on one storage, which
    safetensors refuses to write."""
    seen: set[int] = set()
    out = {}
    for k, v in weights.items():
        v = v.contiguous()
        if v.untyped_storage().data_ptr() in seen:
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        out[k] = v
    return out


def _disk_full(exc: BaseException) -> bool:
    # torch.save reports a full disk as "unexpected pos" from its zip writer, not as ENOSPC.
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "unexpected pos" in str(exc) \
        or "No space left" in str(exc)


def _bytes_needed(model: torch.nn.Module, state: dict[str, Any]) -> int:
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    stack = [state]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            total += item.numel() * item.element_size()
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return total


_LEFTOVER = re.compile(r"\.(tmp|old)-(step-\d+)-\d+")


def recover(out: Path) -> None:
    """Clean up after a crash: a whole leftover copy of a step that has no directory takes
    that name (the newer, temporary one first); every other leftover is removed. Call it only
    while no other run writes to ``out`` (the run holds its lock)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return
    leftovers = sorted((p for p in root.iterdir() if _LEFTOVER.fullmatch(p.name)), key=lambda p: p.name.startswith(".old"))
    for path in leftovers:
        final = root / _LEFTOVER.fullmatch(path.name).group(2)  # type: ignore[union-attr]
        if not final.exists() and path.is_dir() and verify(path) is None:
            os.rename(path, final)
            print(f"gradaccum: recovered checkpoint {final.name} left by an interrupted save", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint at ``path`` is whole, else why it is not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if set(FILES) - set(manifest["sha256"]):
            return f"{MANIFEST} does not list {' and '.join(FILES)}"
        for name, digest in manifest["sha256"].items():
            if sha256(path / name) != digest:
                return f"{name} does not match its checksum (truncated or corrupted)"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST} is unreadable"
    return None


def candidates(out: Path) -> Iterator[Path]:
    """The whole checkpoints under ``out``, newest first; damaged ones are reported and skipped.

    Raises :class:`CheckpointError` when there is none.

    Example:
        >>> next(candidates(Path("runs/train"))).name  # doctest: +SKIP
        'step-0000040'
    """
    root = out / "checkpoints"
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    problems: list[tuple[str, str]] = []
    for path in found:
        why = verify(path)
        if why is None:
            for name, reason in problems:
                print(f"gradaccum: checkpoint {name} is damaged ({reason}); using {path.name}", file=sys.stderr)
            problems = []
            yield path
        else:
            problems.append((path.name, why))
    if problems and len(problems) == len(found):
        detail = "; ".join(f"{n}: {r}" for n, r in problems)
        raise CheckpointError(f"no usable checkpoint in {root} ({detail})")
    if not found:
        raise CheckpointError(f"no checkpoint in {out}: it holds no finished step to resume from; start without --resume")


def latest(out: Path) -> Path:
    """The newest whole checkpoint under ``out`` (see :func:`candidates`)."""
    return next(candidates(out))


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's ``model.safetensors`` into ``model``."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))


def load(path: Path, model: Optional[torch.nn.Module] = None) -> dict[str, Any]:
    """Load the weights into ``model`` (unless None) and return the training state."""
    if model is not None:
        load_weights(model, path)
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)


def load_rank(path: Path, rank: int) -> Optional[dict[str, Any]]:
    """Rank ``rank``'s own state in the checkpoint at ``path`` (None: one written by one process)."""
    file = path / f"rank-{rank}.pt"
    return torch.load(file, map_location="cpu", weights_only=True) if file.is_file() else None
