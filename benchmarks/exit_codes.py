"""How often a finished 2-rank torchrun job reports failure: ``gradaccum train`` in each
``--shard`` mode, and the docs' multi-process scripts as written, N launches each.

Counts launches whose exit code is not 0, and among them the teardown abort ("terminate
called without an active exception"); a plain torch DDP script on gloo, which ends with
``destroy_process_group()`` only, runs beside them as the control.

    python benchmarks/exit_codes.py [--runs 30] [--doc-runs 20] [--modes ddp,fsdp2,zero1,zero2,zero3]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABORT = "terminate called without an active exception"
CLI = ["--task", "lm", "--effective-batch", "6", "--micro-batch", "4", "--max-steps", "2", "--max-length", "24",
       "--train-limit", "24", "--eval-limit", "4", "--save-every", "1"]
CONTROL = """import torch, torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 8))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(20):
    model(torch.randn(4, 8)).sum().backward(); opt.step(); opt.zero_grad()
dist.destroy_process_group()
"""
DISTRIBUTED_PRELUDE = """import os, types
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import gradaccum


class LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(50, 16), torch.nn.Linear(16, 50)

    def forward(self, ids):
        logits = self.head(self.emb(ids))[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), ids[:, 1:].reshape(-1))
        return types.SimpleNamespace(loss=loss)


torch.manual_seed(0)
model, loader = LM(), [{"ids": torch.randint(0, 50, (2, n))} for n in (5, 9, 3, 7, 6)]
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
count = lambda batch: batch["ids"][:, 1:].numel()
"""


def blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def launch(args: list[str], cwd: str) -> tuple[int, bool]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)
    return proc.returncode, ABORT in proc.stderr


def tally(name: str, runs: int, make_args) -> None:
    failed = aborted = 0
    t0 = time.time()
    for _i in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            code, abort = launch(make_args(tmp), tmp)
        failed += code != 0
        aborted += abort
    print(f"{name:<28} {runs:>3} runs: {failed} exited non-zero, {aborted} with the teardown abort "
          f"({(time.time() - t0) / runs:.1f} s each)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--doc-runs", type=int, default=20)
    ap.add_argument("--modes", default="ddp,fsdp2,zero1,zero2,zero3")
    args = ap.parse_args()
    import torch

    print(f"torch {torch.__version__}, gloo, 2 CPU ranks")

    def script(text: str):
        def make(tmp: str) -> list[str]:
            path = Path(tmp) / "script.py"
            path.write_text(text)
            return [str(path)]
        return make

    tally("control: plain DDP (gloo)", args.doc_runs, script(CONTROL))
    tally("docs/distributed.md", args.doc_runs, script(DISTRIBUTED_PRELUDE + blocks("docs/distributed.md")[0]))
    tally("docs/deepspeed.md", args.doc_runs, script(blocks("docs/deepspeed.md")[0]))
    for mode in [m for m in args.modes.split(",") if m]:
        tally(f"gradaccum train --shard {mode}", args.runs,
              lambda tmp, mode=mode: ["-m", "gradaccum", "train", *CLI, "--shard", mode, "--out", str(Path(tmp) / "out")])


if __name__ == "__main__":
    main()
