"""``gradaccum train --shard`` under torchrun (2 CPU ranks): every layout trains the same
weights as DDP, and a run cut after a checkpoint resumes to the uninterrupted run's weights.

The cut is made deterministic: the uninterrupted run saves every step; its last checkpoint
and summary are then removed, as if it had died after the one before, and ``--resume``
finishes it again. Dropout is on and windows are cut by tokens (each rank its own cut), so
the resumed run matches only if every rank gets back its own RNG and place in the data.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import launch

pytest.importorskip("transformers")

ARGS = ["--task", "lm", "--effective-batch", "6", "--micro-batch", "4", "--max-steps", "4", "--max-length", "24",
        "--train-limit", "40", "--eval-limit", "8", "--save-every", "1"]


def _torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), "-m", "gradaccum", "train", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


def _rows(out) -> list[list[str]]:
    """metrics.csv without its last column, the seconds each step took."""
    return [line.split(",")[:-1] for line in (out / "metrics.csv").read_text().splitlines()]


def _same(a: dict, b: dict) -> float:
    # ddp saves GPT-2's tied embedding once; a gathered copy has both names.
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b)


deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed")


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """The uninterrupted DDP run every layout is compared with; what it wrote, checked once."""
    import json

    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(*ARGS, "--out", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and s["effective_batch"] == 12 and s["optimizer_steps"] == 4
    assert len((out / "metrics.csv").read_text().splitlines()) == 5  # header + 4 steps, written once (rank 0)
    assert "x 2 rank(s)" in proc.stdout
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("shard", ["ddp", "fsdp2", "hsdp", pytest.param("zero1", marks=deepspeed),
                                   pytest.param("zero2", marks=deepspeed), pytest.param("zero3", marks=deepspeed)])
def test_each_layout_trains_and_resumes_to_the_uninterrupted_run(tmp_path, ddp_run, shard):
    out = tmp_path / shard
    if shard == "ddp":
        shutil.copytree(ddp_run, out)
    else:
        # hsdp: two copies of one shard each, so the items are counted over the "replicate"
        # dimension: counted over "shard" alone, the weights would not be DDP's.
        extra = ["--replicas", "2"] if shard == "hsdp" else []
        proc = _torchrun(*ARGS, "--shard", shard, *extra, "--out", str(out))
        assert launch.finished(proc), proc.stderr[-3000:]
    last, before = out / "checkpoints" / "step-0000004", out / "checkpoints" / "step-0000003"
    straight = _weights(last)
    # The same weights as DDP (sharded reductions add in another order: 1e-6).
    assert _same(straight, _weights(ddp_run / "checkpoints" / "step-0000004")) < 1e-6
    for r in range(2):  # every rank saved its own place in the data and RNG state
        own = torch.load(before / f"rank-{r}.pt", weights_only=True)
        assert {"consumed", "rng", "accumulator"} <= set(own)
    if shard == "zero2":  # DeepSpeed's own files, as zero1's and zero3's, whose resumes are run
        return
    rows = _rows(out)
    shutil.rmtree(last)
    (out / "summary.json").unlink()
    proc = _torchrun("--resume", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    assert "resuming from" in proc.stdout and "step 3" in proc.stdout
    assert _same(_weights(last), straight) == 0.0  # bit for bit
    assert _rows(out) == rows


@pytest.mark.multiprocess
def test_resume_on_another_number_of_ranks_is_refused_naming_both(tmp_path, ddp_run):
    out = tmp_path / "run"
    shutil.copytree(ddp_run, out)
    (out / "summary.json").unlink()
    proc = _torchrun("--resume", str(out), nproc=1)
    assert proc.returncode != 0
    assert "trained on 2 rank(s) and is resumed on 1" in proc.stderr and "--nproc-per-node 2" in proc.stderr


@pytest.mark.multiprocess
def test_sharded_layouts_refuse_what_they_cannot_do(tmp_path):
    from gradaccum.recipes.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match="--task retrieval with --shard zero2"):
        TrainConfig(task="retrieval", shard="zero2")
    with pytest.raises(ConfigError, match="--precision fp16 with --shard zero3"):
        TrainConfig(shard="zero3", precision="fp16")
    with pytest.raises(ConfigError, match="--accum-dtype with --shard fsdp2"):
        TrainConfig(shard="fsdp2", accum_dtype="float32")
    with pytest.raises(ConfigError, match="--shard must be one of"):
        TrainConfig(shard="zero4")
    with pytest.raises(ConfigError, match="--replicas with --shard fsdp2: only --shard hsdp"):
        TrainConfig(shard="fsdp2", replicas=2)
    from gradaccum.recipes.shard import hsdp_replicas

    with pytest.raises(ConfigError, match="--replicas 3 does not divide the 4 ranks"):
        hsdp_replicas(3, world=4, local_world=4)
    proc = subprocess.run([sys.executable, "-m", "gradaccum", "train", *ARGS, "--shard", "fsdp2", "--out",
                           str(tmp_path / "one")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "start the run under torchrun" in proc.stderr


def _rank_pids(parent: int) -> dict[int, int]:
    """torchrun's workers below ``parent``, by their RANK."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if ppid != parent:
                continue
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


@pytest.mark.multiprocess
def test_a_rank_killed_mid_run_resumes_to_the_uninterrupted_run(tmp_path, ddp_run):
    # The reproduction: rank 1 killed by SIGKILL once a checkpoint exists, then
    # --resume. Every rank must come back to its own place in the data and its own RNG.
    import signal
    import time

    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "gradaccum", "train", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if (out / "checkpoints" / "step-0000002").is_dir():
            ranks = _rank_pids(proc.pid)
            if 1 in ranks:
                os.kill(ranks[1], signal.SIGKILL)
                killed = True
                break
        time.sleep(0.02)
    proc.wait(timeout=120)
    if not killed:
        pytest.skip("the run ended before a rank could be killed")
    assert proc.returncode != 0
    done = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert "step-0000004" not in done or not (out / "summary.json").exists()
    proc = _torchrun("--resume", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    final = out / "checkpoints" / "step-0000004"
    assert _same(_weights(final), _weights(ddp_run / "checkpoints" / "step-0000004")) == 0.0
    assert _rows(out) == _rows(ddp_run)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A small BERT (dropout on) saved with the shipped MiniLM tokenizer: the sentiment and
    retrieval recipes at test speed."""
    import transformers

    from gradaccum.recipes import assets

    tok = transformers.AutoTokenizer.from_pretrained(assets.default_model_dir())
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=32,
                                                           max_position_embeddings=64))
    d = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.mark.multiprocess
@pytest.mark.parametrize("task", ["sentiment-tokens", "sentiment-samples", "retrieval"])
def test_sentiment_and_retrieval_resume_under_torchrun_bit_for_bit(tmp_path, tiny_bert, task):
    args = ["--model", str(tiny_bert), "--train-limit", "48", "--eval-limit", "8", "--max-length", "32",
            "--effective-batch", "8", "--micro-batch", "3", "--max-steps", "4", "--save-every", "1"]
    if task == "retrieval":
        args += ["--task", "retrieval"]
    else:
        args += ["--batching", task.split("-")[1]]
    out = tmp_path / task
    proc = _torchrun(*args, "--out", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    last = out / "checkpoints" / "step-0000004"
    straight, rows = _weights(last), _rows(out)
    shutil.rmtree(last)
    (out / "summary.json").unlink()
    proc = _torchrun("--resume", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    assert _same(_weights(last), straight) == 0.0
    assert _rows(out) == rows


@pytest.mark.multiprocess
def test_a_signal_under_torchrun_checkpoints_every_rank_and_resumes(tmp_path, ddp_run):
    # Ctrl-C on a 2-rank run (SIGINT to the launcher's process group) between --save-every
    # checkpoints: every rank stops at the same window boundary and writes its share, the
    # message names the torchrun command, and --resume ends at the uninterrupted weights.
    import signal
    import time

    out = tmp_path / "signalled"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "gradaccum", "train", *ARGS, "--save-every", "0", "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline, sent = time.time() + 240, False
    while proc.poll() is None and time.time() < deadline:
        metrics = out / "metrics.csv"
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:  # a step done, none saved yet
            os.killpg(proc.pid, signal.SIGINT)
            sent = True
            break
        time.sleep(0.02)
    _, stderr = proc.communicate(timeout=120)
    if not sent or (out / "summary.json").exists():
        pytest.skip("the run ended before it could be interrupted")
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved, stderr[-3000:]
    assert all((saved[-1] / f"rank-{r}.pt").is_file() for r in range(2))
    assert "torchrun --nproc-per-node 2 -m gradaccum train --resume" in stderr, stderr[-3000:]
    assert "outside the training loop" not in stderr
    proc = _torchrun("--resume", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    final = out / "checkpoints" / "step-0000004"
    assert _same(_weights(final), _weights(ddp_run / "checkpoints" / "step-0000004")) == 0.0


@pytest.mark.multiprocess
def test_every_rank_resumes_from_the_same_checkpoint_and_the_shard_it_was_written_with(tmp_path, ddp_run):
    import json

    out = tmp_path / "partial"
    shutil.copytree(ddp_run, out)
    (out / "summary.json").unlink()
    # config.json edited to another --shard than the checkpoints hold: refused, naming both.
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "shard": "fsdp2"}))
    proc = _torchrun("--resume", str(out))
    assert proc.returncode != 0
    assert "written with --shard ddp" in proc.stderr and "--shard fsdp2" in proc.stderr, proc.stderr[-2000:]
    (out / "config.json").write_text(json.dumps(config))
    # The newest checkpoint copied without rank 1's file (its manifest consistent): rank 0 alone
    # could load it; every rank falls back to the one before, together, and ends as the straight run.
    newest = out / "checkpoints" / "step-0000004"
    (newest / "rank-1.pt").unlink()
    manifest = json.loads((newest / "manifest.json").read_text())
    del manifest["sha256"]["rank-1.pt"]
    (newest / "manifest.json").write_text(json.dumps(manifest))
    proc = _torchrun("--resume", str(out))
    assert launch.finished(proc), proc.stderr[-3000:]
    assert "step-0000004 cannot be loaded (rank 1: ValueError: 'its rank-1.pt is missing" in proc.stderr
    assert "step-0000003" in proc.stdout
    assert _same(_weights(newest), _weights(ddp_run / "checkpoints" / "step-0000004")) == 0.0


@pytest.mark.multiprocess
def test_a_launch_that_rank_0_refuses_ends_at_once(tmp_path):
    # Rank 0 refuses (the output is locked) while rank 1 waits for it in the process group's
    # rendezvous, where a Python SIGTERM handler cannot run: torchrun's SIGTERM must end it.
    import time

    from gradaccum.recipes.run import OutputLock

    out = tmp_path / "locked"
    with OutputLock(out):
        started = time.time()
        proc = _torchrun(*ARGS, "--out", str(out))
        took = time.time() - started
    assert proc.returncode != 0 and "in use by another gradaccum run" in proc.stderr
    assert took < 25, f"{took:.0f} s"
