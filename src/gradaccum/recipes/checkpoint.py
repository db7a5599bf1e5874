"""Atomic, verified checkpoints: a run can always resume from its last good one.

Each checkpoint is a directory ``OUT/checkpoints/step-NNNNNNN`` with the model weights
(safetensors), the training state (optimizer, scheduler, accumulator, RNG, progress) and
a manifest of SHA-256 sums written last. It is assembled under a temporary name and
renamed into place, so a crash mid-write leaves no directory that looks complete; a file
damaged later fails its checksum, and loading falls back to the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch

KEEP = 2
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """No usable checkpoint; the message says which were tried and why they failed."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save(out: Path, step: int, model: torch.nn.Module, state: dict[str, Any]) -> Path:
    """Write a checkpoint for ``step`` and drop all but the newest ``KEEP``.

    Example:
        >>> save(Path("runs/train"), 40, model, {"optimizer": opt.state_dict()})  # doctest: +SKIP
    """
    from safetensors.torch import save_model

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (GPT-2's head)
    torch.save(state, tmp / "state.pt")
    files = {name: _sha256(tmp / name) for name in ("model.safetensors", "state.pt")}
    (tmp / MANIFEST).write_text(json.dumps({"step": step, "sha256": files}))
    for f in tmp.iterdir():
        with f.open("rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # the same step saved again (a resumed run's end): replace it
        shutil.rmtree(final)
    os.rename(tmp, final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def verify(path: Path) -> Optional[str]:
    """None if the checkpoint at ``path`` is whole, else why it is not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, digest in manifest["sha256"].items():
            if _sha256(path / name) != digest:
                return f"{name} does not match its checksum (truncated or corrupted)"
    except FileNotFoundError as exc:
        return f"{Path(exc.filename).name} is missing"
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    return None


def latest(out: Path) -> Path:
    """The newest whole checkpoint under ``out``; damaged ones are reported and skipped.

    Example:
        >>> latest(Path("runs/train")).name  # doctest: +SKIP
        'step-0000040'
    """
    root = out / "checkpoints"
    candidates = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True) if root.is_dir() else []
    problems = []
    for path in candidates:
        why = verify(path)
        if why is None:
            for name, reason in problems:
                print(f"gradaccum: checkpoint {name} is damaged ({reason}); using {path.name}", file=sys.stderr)
            return path
        problems.append((path.name, why))
    if problems:
        detail = "; ".join(f"{n}: {r}" for n, r in problems)
        raise CheckpointError(f"no usable checkpoint in {root} ({detail})")
    raise CheckpointError(f"no checkpoint in {out}: it holds no finished step to resume from; start without --resume")


def load(path: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the weights into ``model`` and return the training state."""
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
