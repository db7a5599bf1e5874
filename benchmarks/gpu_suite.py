"""One command for a CUDA GPU (``make gpu``): every CUDA-only test, then the GPU benchmark at
GPT-2 small and at 2 layers, and one summary to paste into ``benchmarks/RESULTS.md``.

Sized for a short lease: the tests take about a minute, each benchmark well under two; the
whole run stops itself after ``--budget`` seconds (default 420, i.e. 7 minutes). Without CUDA
it says so and exits 2 (CPU-only CI never runs it; ``make test`` skips the ``cuda`` tests).

    python benchmarks/gpu_suite.py [--budget 420] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(cmd: list[str], timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout, 1), cwd=ROOT, env=env)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(stopped after {timeout:.0f} s)"
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=420.0, help="seconds for everything (default 420)")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per benchmark loop (default 10)")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu suite: no CUDA device here: nothing to run (CPU-only machines skip it)", file=sys.stderr)
        return 2
    start = time.time()
    left = lambda: args.budget - (time.time() - start)  # noqa: E731
    lines = [f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"]
    code, out = run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"],
                    timeout=min(240.0, left()))
    summary = re.findall(r"^(?:\d+ (?:passed|failed|skipped|error).*)$", out, re.M)
    lines.append(f"cuda tests: {summary[-1] if summary else 'no summary'} (exit {code})")
    lines += [f"  {line}" for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    failed = code != 0
    for layers in (12, 2):
        if left() < 30:
            lines.append(f"benchmark {layers} layers: skipped, the budget is spent")
            continue
        code, out = run([sys.executable, "benchmarks/gpu.py", "--layers", str(layers), "--steps", str(args.steps)],
                        timeout=min(180.0, left()))
        figures = [line for line in out.splitlines() if line.startswith(("plain", "host syncs"))]
        lines.append(f"benchmark GPT-2 {layers} layers, bf16, k=8: " + ("; ".join(figures) or f"exit {code}: {out[-300:]}"))
        failed |= code != 0
    lines.append(f"total {time.time() - start:.0f} s")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
