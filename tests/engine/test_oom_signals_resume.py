"""Out-of-memory retries, signals and resume: the update stays the big batch's."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from support.reference import OOMAbove, RecordingSGD, f64_grads, rel_error


def model_with(where, limit=3):
    torch.manual_seed(0)
    # The injection sits after the first layer: in backward, the later layers' gradients
    # are already accumulated when it fails.
    return torch.nn.Sequential(torch.nn.Linear(5, 16), OOMAbove(limit, where), torch.nn.Tanh(), torch.nn.Linear(16, 3))


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_oom_splits_and_the_window_stays_exact(where):
    model = model_with(where)
    clean = copy.deepcopy(model)
    clean[1].limit = 10**9  # the reference is the one big batch, which fits
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=3)
    g = torch.Generator().manual_seed(1)
    sizes = [8, 5, 2]
    batches = [(torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in sizes]

    def loss_fn(b):
        return F.cross_entropy(model(b[0]), b[1]), len(b[1])

    for window in acc.windows(batches):
        for b in window:
            window.forward_backward(b, loss_fn)
        report = window.step()
    oom_layer = model[1]
    assert report.splits >= 2 and report.micro_batches == 3 and report.num_items == 15
    raised_first = oom_layer.raised
    X, Y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    want = f64_grads(clean, lambda m: F.cross_entropy(m(X.double()), Y))
    assert rel_error(opt.seen[0], want) < 1e-6
    # The working split is remembered: the next window starts from it and never fails.
    for window in acc.windows(batches[:1]):
        for b in window:
            window.forward_backward(b, loss_fn)
        assert window.step().splits == 0
    assert oom_layer.raised == raised_first


def test_one_item_that_still_runs_out_of_memory_reraises():
    model = model_with("forward", limit=0)
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    window = next(iter(acc.windows([(torch.randn(2, 5), torch.tensor([0, 1]))])))
    for b in window:
        with pytest.raises(torch.OutOfMemoryError, match="cannot be split further"):
            window.forward_backward(b, lambda b: (F.cross_entropy(model(b[0]), b[1]), 2))
    assert all(p.grad is None for p in model.parameters())


def test_split_batch_handles_dicts_and_tuples():
    from gradaccum.engine.split import split_batch

    batch = {"input_ids": torch.arange(10).view(5, 2), "meta": [torch.arange(5), "x"]}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2]
    assert torch.equal(parts[1]["meta"][0], torch.tensor([3, 4])) and parts[1]["meta"][1] == "x"


def test_split_batch_keeps_a_batch_encoding():
    transformers = pytest.importorskip("transformers")
    from gradaccum.engine.split import split_batch

    enc = transformers.BatchEncoding({"input_ids": torch.arange(12).view(3, 4), "attention_mask": torch.ones(3, 4)})
    parts = split_batch(enc, 2)
    assert all(type(p) is transformers.BatchEncoding for p in parts)
    assert torch.equal(parts[0]["input_ids"], enc["input_ids"][:2]) and parts[1].input_ids.shape == (1, 4)
    assert parts[1].to("cpu")["attention_mask"].shape == (1, 4)  # still a BatchEncoding's API


@pytest.mark.multiprocess
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigint_checkpoints_mid_window_and_resume_gives_the_same_weights(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file

    args = ["--task", "lm", "--effective-batch", "8", "--micro-batch", "2", "--epochs", "1",
            "--max-length", "24", "--train-limit", "64", "--eval-limit", "8", "--lr", "1e-3", "--save-every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, "-m", "gradaccum", "train", *args, "--out", str(straight)], check=True, env=env,
                   capture_output=True, timeout=300)
    broken = tmp_path / "broken"
    proc = subprocess.Popen([sys.executable, "-m", "gradaccum", "train", *args, "--out", str(broken)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = broken / "metrics.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "stopped by signal SIGINT" in err and "--resume" in err
    done = subprocess.run([sys.executable, "-m", "gradaccum", "train", "--resume", str(broken)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    a = load_file(sorted((straight / "checkpoints").iterdir())[-1] / "model.safetensors")
    b = load_file(sorted((broken / "checkpoints").iterdir())[-1] / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    assert json.loads((broken / "summary.json").read_text())["optimizer_steps"] == 8


def test_plan_parses_budgets_and_recommends_the_fastest_that_fits():
    from gradaccum.recipes.config import ConfigError
    from gradaccum.recipes.plan import Trial, parse_bytes, recommend

    assert parse_bytes("6GiB") == 6 * 2**30 and parse_bytes("512 MB") == 512 * 10**6
    with pytest.raises(ConfigError, match="--memory-budget"):
        parse_bytes("lots")
    trials = [Trial(4, 100, 0.1, True), Trial(8, 180, 0.15, True), Trial(16, 400, 0.5, False)]
    assert recommend(trials, 16).micro_batch == 8  # 53 samples/s beats 40, and 16 does not fit
    trials[1] = Trial(8, 180, 0.4, True)
    assert recommend(trials, 16).micro_batch == 4  # the largest that fits is not the fastest


def test_plan_names_the_least_sharded_mode_that_fits():
    from gradaccum.recipes.plan import SHARD_ORDER, shard_bytes

    params = 1_000_000  # 16 MB of state whole: 4 weights + 4 gradient + 8 AdamW bytes each
    per_rank = {m: shard_bytes(m, params, 4) for m in SHARD_ORDER}
    assert per_rank["ddp"] == 16_000_000 and per_rank["zero3"] == 4_000_000
    assert per_rank["ddp"] > per_rank["zero1"] > per_rank["zero2"] >= per_rank["fsdp2"] > per_rank["zero3"]
    budget = 8_000_000
    assert [m for m in SHARD_ORDER if per_rank[m] <= budget][0] == "zero2"


def test_plan_command_and_micro_batch_auto(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    from gradaccum.cli import main

    tiny = ["--task", "lm", "--effective-batch", "4", "--max-length", "16", "--train-limit", "16", "--eval-limit", "4"]
    assert main(["plan", *tiny, "--memory-budget", "8GiB"]) == 0
    printed = capsys.readouterr().out
    assert "recommended: --micro-batch" in printed and "recommended token budget" in printed
    # 8 GiB holds this small model whole on every rank: DDP, the least communication.
    assert "--shard for 2 ranks: ddp" in printed and "-> ddp" in printed
    out = tmp_path / "run"
    assert main(["train", *tiny, "--micro-batch", "auto", "--epochs", "1", "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert isinstance(saved["micro_batch"], int) and 1 <= saved["micro_batch"] <= 4
    # --micro-batch auto also takes the recommended token budget: m x the longest text.
    assert saved["max_tokens"] == saved["micro_batch"] * 16
    # The process's high-water mark is shared with earlier tests: fake a measurement over budget.
    import gradaccum.recipes.plan as plan_module

    monkeypatch.setattr(plan_module, "measure", lambda step, size, device, base: (2**40, 0.1))
    assert main(["plan", *tiny, "--memory-budget", "1GiB"]) == 2
    assert "no micro-batch size fits" in capsys.readouterr().err
