"""The CLI under faults: deterministic injection (a signal after the N-th backward, a crash
between the steps of a save, a full disk), never timing."""

from __future__ import annotations

import csv
import json
import os
import signal

import pytest
import torch

pytest.importorskip("transformers")

from gradaccum.cli import main  # noqa: E402
from gradaccum.engine import accumulator  # noqa: E402

TINY = ["--task", "lm", "--effective-batch", "4", "--micro-batch", "2", "--epochs", "2", "--max-length", "16",
        "--train-limit", "10", "--eval-limit", "4", "--save-every", "0", "--lr", "1e-3"]


def weights(out):
    from safetensors.torch import load_file

    last = sorted((out / "checkpoints").iterdir())[-1]
    return load_file(last / "model.safetensors")


def metric_rows(out):
    with (out / "metrics.csv").open(newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


def signal_after(monkeypatch, n, sig=signal.SIGINT):
    """Send ``sig`` to this process right after the n-th micro-batch's backward."""
    real = accumulator.Window.forward_backward
    seen = [0]

    def hooked(self, batch, loss_fn):
        real(self, batch, loss_fn)
        seen[0] += 1
        if seen[0] == n:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(accumulator.Window, "forward_backward", hooked)


def test_resume_after_an_interruption_at_every_micro_batch_gives_the_straight_run(straight, tmp_path, monkeypatch):
    # 10 examples in windows of 4: windows of 2, 2, 1 micro-batches per epoch, 2 epochs.
    total = 10
    want_w, want_rows = weights(straight), metric_rows(straight)
    assert len(want_rows) == 6
    for n in range(1, total + 1):
        out = tmp_path / f"n{n}"
        with monkeypatch.context() as m:
            signal_after(m, n, signal.SIGINT if n % 2 else signal.SIGTERM)
            assert main(["train", *TINY, "--out", str(out)]) == 130, n
        assert main(["train", "--resume", str(out)]) == 0, n
        got = weights(out)
        assert all(torch.equal(got[k], want_w[k]) for k in want_w), f"weights differ after an interruption at {n}"
        assert metric_rows(out) == want_rows, f"metrics.csv differs after an interruption at {n}"


# -- bad input: a clear message and exit 2, checked in a real subprocess ------------------

def cli(*args, cwd=None, stdin=None):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "gradaccum", *args], capture_output=True, text=True,
                          cwd=cwd, input=stdin, timeout=300)


def refused(proc, *phrases):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr) < 2000, f"a {len(proc.stderr)}-character message"


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "args,phrase",
    [
        (["train", "--device", "cudaXYZ"], "--device must be auto, cpu, cuda or cuda:N"),
        (["train", "--seed", "99999999999999999999999"], "--seed must be an int from 0"),
        (["train", "--memory-budget", "1.2.3GB"], "--memory-budget '1.2.3GB'"),
        (["plan", "--memory-budget", "."], "--memory-budget '.'"),
        (["train", "--effective-batch", "100000000000", "--micro-batch", "1"], "--effective-batch 100000000000 is more than"),
        (["train", "--effective-batch", "1000000000", "--micro-batch", "1"], "--effective-batch 1000000000 is more than"),
    ],
)
def test_bad_flags_exit_2_with_a_clear_message(tmp_path, args, phrase):
    refused(cli(*args, "--out", str(tmp_path / "run")), phrase)
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("line", ["out = 5", "device = 5", "data = 5", 'model = ["a"]', "resume = 5", "micro_batch = 2.5"])
def test_config_file_values_of_the_wrong_type(tmp_path, line):
    f = tmp_path / "c.toml"
    f.write_text(line + "\n")
    refused(cli("train", "--config", str(f)), "must be")


@pytest.mark.multiprocess
def test_config_file_that_is_not_utf8_or_an_alias_bomb(tmp_path):
    f = tmp_path / "c.toml"
    f.write_bytes(b"epochs = 2\nout = '\xff\xfe'\n")
    refused(cli("train", "--config", str(f)), "not UTF-8")
    bomb = tmp_path / "bomb.yaml"
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[i]
        lines.append(f"{name}: &{name} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    lines.append("epochs: *h")
    bomb.write_text("\n".join(lines) + "\n")
    assert len(bomb.read_bytes()) < 700
    refused(cli("train", "--config", str(bomb)), "unknown option")
    bomb.write_text("\n".join(lines[:-1]).replace("b: &b", "epochs: &b").replace("*b", "*b") + "\n")
    refused(cli("train", "--config", str(bomb)))


@pytest.mark.multiprocess
def test_resume_with_a_damaged_or_foreign_config_or_another_out(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"epochs": 2, "out": "x"')
    refused(cli("train", "--resume", str(run)), "config.json is damaged")
    (run / "config.json").write_text('{"epochs": 2, "speed": 9}')
    refused(cli("train", "--resume", str(run)), "unknown: ['speed']")
    (run / "config.json").write_text(json.dumps({"epochs": 2, "out": str(run)}))
    refused(cli("train", "--resume", str(run), "--out", str(tmp_path / "elsewhere")), "continues in its own directory")


@pytest.mark.multiprocess
def test_help_names_paths_and_says_each_default_once():
    text = cli("train", "--help").stdout
    assert "--memory-budget SIZE" in text and "--model DIR" in text and "--data FILE" in text and "--out DIR" in text
    assert "STR" not in text
    options = text[text.index("options:"):]
    block = options[options.index("--memory-budget"):options.index("--epochs")]
    assert block.count("default") == 1, block


# -- data and model directories ------------------------------------------------------------

def test_csv_with_a_bom_and_a_long_field_and_jsonl_line_numbers(tmp_path):
    from gradaccum.recipes.config import ConfigError, TrainConfig
    from gradaccum.recipes.data import load_splits

    f = tmp_path / "excel.csv"
    rows = "".join(f"review {i} {'long ' * (40000 if i == 3 else 1)},{'good' if i % 2 else 'bad'}\n" for i in range(10))
    f.write_bytes(b"\xef\xbb\xbf" + ("text,label\n" + rows).encode())
    splits = load_splits(TrainConfig(data=str(f)))
    assert splits.labels == ["bad", "good"] and max(map(len, splits.train_texts + splits.eval_texts)) > 128 * 1024
    j = tmp_path / "d.jsonl"
    j.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"text": "c", "label": \n')
    with pytest.raises(ConfigError, match="line 4 is not JSON"):
        load_splits(TrainConfig(data=str(j)))
    j.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n{"label": "x"}\n')
    with pytest.raises(ConfigError, match="missing or empty on line 4"):
        load_splits(TrainConfig(data=str(j)))


@pytest.fixture
def minilm_copy(tmp_path):
    import shutil

    from gradaccum.recipes import assets

    d = tmp_path / "model"
    shutil.copytree(assets.default_model_dir(), d)
    return d


def test_model_directory_without_tokenizer_files_is_refused(minilm_copy, tmp_path, capsys):
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (minilm_copy / name).unlink()
    assert main(["train", "--model", str(minilm_copy), "--out", str(tmp_path / "run")]) == 2
    assert "tokenizer files" in capsys.readouterr().err
    # --task retrieval checks the same (it trained on [UNK] alone before).
    assert main(["train", "--task", "retrieval", "--model", str(minilm_copy), "--out", str(tmp_path / "r")]) == 2
    assert "tokenizer files" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess
def test_model_directory_with_its_own_code_is_never_run(minilm_copy, tmp_path):
    marker = tmp_path / "code-ran"
    (minilm_copy / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('yes')\n")
    cfg = json.loads((minilm_copy / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForSequenceClassification": "evil.Model", "AutoConfig": "evil.Config"}
    (minilm_copy / "config.json").write_text(json.dumps(cfg))
    proc = cli("train", "--model", str(minilm_copy), "--out", str(tmp_path / "run"), stdin="y\ny\ny\n")
    refused(proc, "never runs code from a model directory")
    assert not marker.exists()


@pytest.mark.multiprocess
@pytest.mark.parametrize("damage", ["truncated", "pickled"])
def test_damaged_or_pickled_weights_are_refused(minilm_copy, tmp_path, damage):
    marker = tmp_path / "payload-ran"
    weights = minilm_copy / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100_000])
    else:
        weights.unlink()
        import pickle

        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        (minilm_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Payload()}))
    refused(cli("train", "--model", str(minilm_copy), "--out", str(tmp_path / "run")), "cannot load its weights")
    assert not marker.exists()


# -- the output directory ------------------------------------------------------------------

@pytest.mark.multiprocess
def test_a_second_run_into_the_same_out_exits_2_naming_the_first(tmp_path):
    from gradaccum.recipes.run import OutputLock

    out = tmp_path / "run"
    with OutputLock(out):  # this test process plays the first run
        refused(cli("train", "--out", str(out)), f"in use by another gradaccum run (process {os.getpid()})")
    refused(cli("train", "--out", str(out), "--device", "bad"))  # unlocked again: now only the bad flag


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path, monkeypatch, capsys):
    import gradaccum.recipes.data as data

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_splits", interrupted)
    monkeypatch.setattr("gradaccum.recipes.model.load_splits", interrupted)
    assert main(["train", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "interrupted before training started" in err and "Traceback" not in err


def test_missing_matplotlib_is_found_before_training(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- checkpoints: crashes inside a save, a full disk, damaged and foreign checkpoints --------

def test_a_crash_between_the_steps_of_a_save_always_leaves_a_whole_checkpoint(tmp_path, monkeypatch):
    from gradaccum.recipes import checkpoint

    model = torch.nn.Linear(3, 2)
    out = tmp_path / "run"
    checkpoint.save(out, 4, model, {"n": 1})
    operations = ["rename", "rmtree"]
    for point in range(4):  # each rename and removal of a re-save of step 4, in turn
        calls = [0]

        def crash_on(kind, real):
            def wrapped(*a, **kw):
                calls[0] += 1
                if calls[0] == point + 1:
                    raise SystemExit(f"crash before {kind}")
                return real(*a, **kw)
            return wrapped

        with monkeypatch.context() as m:
            m.setattr(checkpoint.os, "rename", crash_on("rename", os.rename))
            m.setattr(checkpoint.shutil, "rmtree", crash_on("rmtree", checkpoint.shutil.rmtree))
            with torch.no_grad():
                model.weight.add_(1.0)
            try:
                checkpoint.save(out, 4, model, {"n": point + 2})
            except SystemExit:
                pass
        checkpoint.recover(out)
        whole = checkpoint.latest(out)
        assert whole.name == "step-0000004", operations
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000004"]  # no leftovers


def test_a_full_disk_says_so_and_the_run_resumes_to_the_same_weights(straight, tmp_path, monkeypatch, capsys):
    from gradaccum.recipes import checkpoint

    out = tmp_path / "run"
    real = torch.save
    saves = [0]

    def full_disk(obj, f, *a, **kw):
        saves[0] += 1
        if saves[0] == 2:  # the end-of-run checkpoint: as torch's zip writer reports it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 5312 vs 5204")
        return real(obj, f, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    assert main(["train", *TINY, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and "MiB needed" in err and "--resume" in err
    assert not any(p.name.startswith(".tmp") for p in (out / "checkpoints").iterdir())
    monkeypatch.setattr(checkpoint.torch, "save", real)
    assert main(["train", "--resume", str(out)]) == 0
    want, got = weights(straight), weights(out)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("damage", ["other shape", "empty manifest", "pickle payload", "stale temporary"])
def test_resume_falls_back_past_a_damaged_or_foreign_checkpoint(tmp_path, capsys, damage):
    import hashlib
    import pickle

    from safetensors.torch import load_file, save_file

    out = tmp_path / "run"
    args = [*TINY, "--save-every", "1", "--max-steps", "3"]
    assert main(["train", *args, "--out", str(out)]) == 0
    root = out / "checkpoints"
    newest = sorted(root.iterdir())[-1]
    marker = tmp_path / "payload-ran"
    if damage == "other shape":
        tensors = load_file(newest / "model.safetensors")
        key = next(iter(tensors))
        tensors[key] = torch.zeros(3, 3)
        save_file(tensors, newest / "model.safetensors")
    elif damage == "pickle payload":
        class Payload:
            def __reduce__(self):
                return (open, (str(marker), "w"))
        (newest / "state.pt").write_bytes(pickle.dumps({"optimizer": Payload()}))
    if damage in ("other shape", "pickle payload"):  # checksums made to match: only loading can tell
        manifest = json.loads((newest / "manifest.json").read_text())
        for name in manifest["sha256"]:
            manifest["sha256"][name] = hashlib.sha256((newest / name).read_bytes()).hexdigest()
        (newest / "manifest.json").write_text(json.dumps(manifest))
    elif damage == "empty manifest":
        (newest / "manifest.json").write_text(json.dumps({"step": 3, "sha256": {}}))
    else:
        (root / ".tmp-step-0000009-424242").mkdir()
        (root / ".tmp-step-0000009-424242" / "model.safetensors").write_bytes(b"half")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    if damage == "stale temporary":
        assert not (root / ".tmp-step-0000009-424242").exists()
    else:
        assert ("cannot be loaded" in err or "damaged" in err) and newest.name in err, err
    assert not marker.exists()
    assert json.loads((out / "summary.json").read_text())["optimizer_steps"] == 4


def test_data_files_are_read_strictly_and_errors_name_the_line(tmp_path):
    # Each of these trained silently on something else, or failed without a line, before.
    import os

    from gradaccum.recipes.config import ConfigError, TrainConfig
    from gradaccum.recipes.data import load_splits

    def refused(name: str, content: bytes, message: str) -> None:
        f = tmp_path / name
        f.write_bytes(content)
        with pytest.raises(ConfigError, match=message):
            load_splits(TrainConfig(data=str(f)))

    good = "".join(f"review {i},{'good' if i % 2 else 'bad'}\n" for i in range(20))
    refused("dup.csv", ("text,label,text\n" + "".join(f"a{i},x,b{i}\n" for i in range(5))).encode(),
            "the header has the column 'text' twice")
    refused("dup.jsonl", b'{"text": "a", "label": "x"}\n{"text": "b", "label": "y", "text": "c"}\n',
            "line 2 has the key 'text' twice")
    lines = good.splitlines(keepends=True)
    lines[4] = '"review 4,bad\n'  # an unterminated quote: it would swallow the lines after it
    refused("open.csv", ("text,label\n" + "".join(lines)).encode(), "not a readable CSV|field\\(s\\) for 2 columns")
    # An unterminated quote on the last lines: the error names the line it opens on (line 4), not the one before.
    refused("end.csv", b'text,label\n"a",good\n"b",bad\n"c,bad\nd,good\n', "the row starting on line 4: .*never closed")
    refused("short.csv", ("text,label\n" + good + "lonely\n").encode(), "line 22 has 1 field\\(s\\) for 2 columns")
    refused("list.jsonl", b'{"text": "a", "label": "x"}\n{"text": ["b", "c"], "label": "y"}\n',
            "--text-field 'text' on line 2 is a list")
    refused("latin1.csv", ("text,label\n" + good).encode() + "caf\u00e9,good\n".encode("latin-1"),
            "line 22 is not UTF-8 \\(byte 0xe9\\)")
    with pytest.raises(ConfigError, match="a directory, not a file"):
        TrainConfig(data=str(tmp_path))
    fifo = tmp_path / "pipe.csv"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        TrainConfig(data=str(fifo))


def test_interrupts_outside_the_training_loop_say_what_is_kept(tmp_path, monkeypatch, capsys):
    # SIGINT or SIGTERM during an evaluation (an epoch's, inside the loop; the final one of a
    # --max-steps run, after it) and SIGTERM at start-up: the message says what was kept and
    # how to go on, and the exit code is 130 / 143; at start-up nothing is left behind.
    from gradaccum.recipes import train

    real_eval, real_plot = train.evaluate, train.report.plot_loss
    cases = [(signal.SIGINT, "evaluate", 130, "after the evaluation of epoch 1"),
             (signal.SIGTERM, "evaluate", 130, "after the evaluation of epoch 1"),
             (signal.SIGINT, "plot_loss", 130, "interrupted outside the training loop; the run's checkpoints"),
             (signal.SIGTERM, "plot_loss", 143, "stopped by SIGTERM outside the training loop; the run's checkpoints")]
    for i, (sig, where, code, said) in enumerate(cases):
        out = tmp_path / f"case{i}"

        def evaluate(*args, sig=sig, **kwargs):
            os.kill(os.getpid(), sig)
            return real_eval(*args, **kwargs)

        def plot_loss(*args, sig=sig, **kwargs):  # the end of the run, after the last evaluation
            os.kill(os.getpid(), sig)
            return real_plot(*args, **kwargs)

        with monkeypatch.context() as m:
            if where == "evaluate":
                m.setattr(train, "evaluate", evaluate)
            else:
                m.setattr(train.report, "plot_loss", plot_loss)
            assert main(["train", *TINY, "--save-every", "1", "--out", str(out)]) == code, i
        err = capsys.readouterr().err
        assert said in err and f"--resume {out}" in err, (i, err)
        assert "before training started" not in err
        assert main(["train", "--resume", str(out)]) == 0  # and it continues from there
        capsys.readouterr()
    out = tmp_path / "startup"

    def prepare(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as m:
        m.setattr(train, "prepare", prepare)
        assert main(["train", *TINY, "--out", str(out)]) == 143
    assert "stopped by SIGTERM before training started; nothing was trained" in capsys.readouterr().err
    assert not out.exists()  # nothing was written: not even OUT/.lock (it was left behind before)


def test_plan_and_verify_refuse_retrieval_and_short_lengths_and_runs_without_negatives(tmp_path, capsys):
    from gradaccum.recipes.config import ConfigError, TrainConfig

    for command in ("plan", "verify"):
        assert main([command, "--task", "retrieval", "--train-limit", "8"]) == 2
        assert f"gradaccum {command} " in capsys.readouterr().err  # names itself and what it does not check
    with pytest.raises(ConfigError, match="--max-length 1 is below 4 tokens"):
        TrainConfig(max_length=1)
    for extra in (["--effective-batch", "1"], ["--negatives", "micro-batch", "--micro-batch", "1"]):
        assert main(["train", "--task", "retrieval", *extra, "--out", str(tmp_path / "r")]) == 2
        assert "each query sees no other example to be a negative" in capsys.readouterr().err


def test_resume_on_a_changed_data_file_is_refused_unless_asked(tmp_path, capsys):
    f = tmp_path / "reviews.csv"
    rows = [f"review number {i} {'great' if i % 2 else 'awful'},{'good' if i % 2 else 'bad'}\n" for i in range(20)]
    f.write_text("text,label\n" + "".join(rows))
    out = tmp_path / "run"
    args = ["train", "--data", str(f), "--max-length", "16", "--effective-batch", "4", "--micro-batch", "2",
            "--epochs", "2", "--save-every", "1", "--out", str(out)]
    assert main(args) == 0
    (out / "summary.json").unlink()  # as if it had stopped after its last checkpoint
    rows[2] = rows[2].replace("awful", "fine").replace(",bad", ",good")  # one word and one label
    f.write_text("text,label\n" + "".join(rows))
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--data {f} changed since the run's checkpoint" in err and "--data-changed" in err
    assert main(["train", "--resume", str(out), "--data-changed"]) == 0


def test_options_without_effect_get_a_notice_and_yaml_numbers_as_text_say_why(tmp_path, capsys, monkeypatch):
    import gradaccum.recipes.train as train_module
    from gradaccum.recipes import retrieval

    monkeypatch.setattr(train_module, "run", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(retrieval, "run", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["train", "--batching", "samples", "--max-tokens", "64", "--out", str(tmp_path / "a")]) == 130
    assert "notice: --max-tokens has no effect with --batching samples" in capsys.readouterr().err
    assert main(["train", "--task", "retrieval", "--pooling", "head", "--label-smoothing", "0.2",
                 "--out", str(tmp_path / "b")]) == 130
    err = capsys.readouterr().err
    assert "notice: --pooling has no effect with --task retrieval" in err
    assert "notice: --label-smoothing has no effect with --task retrieval" in err
    assert main(["train", "--out", str(tmp_path / "c")]) == 130  # the defaults: no notice
    assert "notice" not in capsys.readouterr().err
    pytest.importorskip("yaml")
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5e-5\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "got '5e-5' (text, not a number: YAML reads 5e-5 without a dot as text; write 5.0e-5" in capsys.readouterr().err


def test_plan_checks_the_budget_before_measuring_and_a_cpu_allocation_failure_is_out_of_memory(capsys, monkeypatch):
    import gradaccum.recipes.plan as plan_module

    tiny = ["--task", "lm", "--effective-batch", "4", "--max-length", "16", "--train-limit", "16", "--eval-limit", "4"]
    assert main(["plan", *tiny, "--memory-budget", "64KiB"]) == 2
    assert "less than the model's own weights and gradient" in capsys.readouterr().err
    # The CPU allocator raises a plain RuntimeError: at 4 rows it is the budget's end, not a
    # traceback. (Measurements faked: the process's high-water mark is shared with earlier tests.)
    def measure(step, size, device, base, repeats=2):
        if size >= 4:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 68719476736 bytes")
        return size * 2**20, 0.01

    monkeypatch.setattr(plan_module, "measure", measure)
    assert main(["plan", *tiny, "--memory-budget", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "micro-batch    4: out of memory" in out and "recommended: --micro-batch 2" in out


def test_plan_and_verify_run_in_one_process_and_say_what_shard_does_not_do(capsys, monkeypatch):
    tiny = ["--task", "lm", "--effective-batch", "4", "--micro-batch", "2", "--max-length", "16", "--train-limit", "16"]
    assert main(["verify", *tiny, "--shard", "zero2"]) == 0
    captured = capsys.readouterr()
    assert "--shard has no effect here" in captured.err and "eval(): exact" in captured.out
    # Under torchrun only rank 0 measures; the others print nothing and end.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["plan", *tiny]) == 0 and main(["verify", *tiny]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    # One micro-batch is the big batch itself: nothing to compare, said so.
    assert main(["verify", *tiny, "--micro-batch", "4"]) == 2
    assert "there is nothing to compare" in capsys.readouterr().err
    import gradaccum

    with pytest.raises(ValueError, match="steps >= 2"):
        gradaccum.verify(torch.nn.Linear(2, 1), lambda b: b.sum(), torch.ones(4, 2), steps=1)
