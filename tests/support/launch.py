"""Launching the tests' child processes, and what counts as a finished launch: exit code 0.

A rank that has done all its work can abort in gloo's teardown on torch 2.13 ("terminate
called without an active exception"; ``gradaccum/_end.py`` says why). Every worker here, the
CLI and the docs' scripts end through ``gradaccum.end_rank``, so such an abort is a failure.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

TESTS = str(Path(__file__).resolve().parent.parent)


def env(**extra: str) -> dict:
    """The environment of a test's child processes: ``support`` importable (the workers run
    as ``python -m support.<worker>``), one thread each."""
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


TEARDOWN_ABORT = "terminate called without an active exception"


def finished(proc: subprocess.CompletedProcess) -> bool:
    """A launch that finished: exit code 0 (every rank ends through ``gradaccum.end_rank``;
    a teardown abort after the work, ``TEARDOWN_ABORT``, is a failure too)."""
    return proc.returncode == 0
