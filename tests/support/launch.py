"""What a torchrun launch in these tests counts as finished.

On these CPU machines (torch 2.13, gloo, 2 processes) a rank that has done all its work
sometimes aborts in C++ teardown after Python has finished ("terminate called without an
active exception", SIGABRT; measured about 1 run in 10 for DeepSpeed's 2-rank loop, with or
without gradaccum and with ``destroy_process_group``), and torchrun then reports the job
failed and stops the other rank. Such a launch counts as finished only when that abort is
the whole failure: every failed rank ended by SIGABRT or by torchrun's SIGTERM, none by an
exception. The tests then check every output the run had to write, so a run that did not
finish its work still fails.
"""

from __future__ import annotations

import os
import re
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
    if proc.returncode == 0:
        return True
    stderr = proc.stderr or ""
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)
    return TEARDOWN_ABORT in stderr and bool(codes) and set(codes) <= {"-6", "-15"}
