"""`gradaccum train`: end to end on a tiny subset, config errors, resume, the LM recipe."""

from __future__ import annotations

import copy
import csv
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import gradaccum  # noqa: E402
from gradaccum.cli import main  # noqa: E402
from gradaccum.recipes import train  # noqa: E402
from gradaccum.recipes.config import TrainConfig  # noqa: E402
from gradaccum.recipes.data import Batcher  # noqa: E402
from support.reference import RecordingSGD, rel_error  # noqa: E402

TINY = ["--train-limit", "24", "--eval-limit", "16", "--max-length", "32"]


def test_end_to_end_tiny_subset(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", "--effective-batch", "12", "--micro-batch", "5", "--epochs", "2", "--out", str(out),
                 "--batching", "samples", "--class-weights", "none", *TINY])
    assert code == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["effective_batch"] == 12 and s["k"] == 3 and s["micro_batch_sizes"] == [5, 5, 2]
    assert s["optimizer_steps"] == 4 and s["num_train"] == 24
    assert {"accuracy", "macro_f1", "loss"} <= set(s["eval"])
    assert {"accuracy", "macro_f1"} <= set(s["baseline"]) and s["baseline"]["label"] in s["labels"]
    assert s["peak_memory_bytes"] > 0 and s["train_seconds"] > 0
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # Each window is exactly the effective batch: 12 samples in 3 micro-batches of 5, 5, 2.
    assert all(r["num_items"] == "12" and r["micro_batches"] == "3" for r in rows)
    assert (out / "loss.png").stat().st_size > 1000
    ckpt = sorted((out / "checkpoints").iterdir())[-1]
    assert {p.name for p in ckpt.iterdir()} == {"model.safetensors", "state.pt", "manifest.json"}
    printed = capsys.readouterr().out
    assert "majority class" in printed and "TF-IDF + logistic regression" in printed and "padded per real" in printed
    assert {"accuracy", "macro_f1"} <= set(s["tfidf_baseline"]) and s["tokens"]["real"] <= s["tokens"]["padded"]


@pytest.mark.multiprocess
def test_help_documents_every_option_with_its_default():
    proc = subprocess.run([sys.executable, "-m", "gradaccum", "train", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for flag in ("--effective-batch", "--micro-batch", "--epochs", "--max-steps", "--lr", "--lr-scaling",
                 "--base-batch", "--warmup", "--max-grad-norm", "--precision", "--accum-dtype", "--max-length",
                 "--task", "--model", "--data", "--text-field", "--label-field", "--out", "--seed",
                 "--save-every", "--resume", "--config", "--tensorboard", "--label-smoothing"):
        assert flag in text, flag
    assert "(default: 32)" in text and "(default: sentiment)" in text


@pytest.mark.parametrize(
    "args,message",
    [
        (["--effective-batch", "4", "--micro-batch", "8"], "--effective-batch (4) is smaller than --micro-batch (8)"),
        (["--micro-batch", "0"], "--micro-batch must be an int >= 1"),
        (["--lr", "-1"], "--lr must be a number > 0"),
        (["--warmup", "2.5"], "--warmup must be"),
        (["--label-smoothing", "1"], "--label-smoothing must be a number from 0 to below 1"),
        (["--data", "/nonexistent/reviews.csv"], "--data /nonexistent/reviews.csv: no such file"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such directory"),
    ],
)
def test_config_errors_exit_2_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_bad_choice_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--precision", "fp8"])
    assert exc.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_data_file_problems(tmp_path, capsys):
    f = tmp_path / "notes.csv"
    f.write_text("note,diagnosis\nchest pain,cardio\nrash,derm\ncough,pulmo\nfever,pulmo\nitch,derm\n")
    out = tmp_path / "run"
    assert main(["train", "--data", str(f), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--text-field 'text' is missing" in err and "note" in err
    # Every label occurs once, so the held-out rows' labels are never seen in training.
    f.write_text("note,diagnosis\n" + "".join(f"note {i},label{i}\n" for i in range(10)))
    assert main(["train", "--data", str(f), "--text-field", "note", "--label-field", "diagnosis", "--out", str(out)]) == 2
    assert "occur only in the held-out part" in capsys.readouterr().err
    assert not out.exists()


def test_model_dir_without_weights(tmp_path, capsys):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    assert main(["train", "--model", str(d), "--out", str(tmp_path / "o")]) == 2
    assert "no weights in it" in capsys.readouterr().err


def test_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["train", "--out", str(blocker / "sub"), *TINY]) == 2
    assert "cannot write there" in capsys.readouterr().err


def test_config_file_and_unknown_keys(tmp_path, capsys):
    good = tmp_path / "c.toml"
    good.write_text('effective-batch = 6\nmicro_batch = 4\n')
    cfg_values = gradaccum.recipes.config.read_config_file(str(good))
    assert TrainConfig(**cfg_values).micro_batch_sizes == [4, 2]
    bad = tmp_path / "bad.toml"
    bad.write_text("learning_rate = 3\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "unknown option 'learning_rate'" in capsys.readouterr().err


def lm_args(out):
    return ["--task", "lm", "--effective-batch", "6", "--micro-batch", "4", "--epochs", "2",
            "--max-length", "24", "--train-limit", "20", "--eval-limit", "8", "--lr", "1e-3",
            "--save-every", "2", "--out", str(out)]


def test_resume_ends_with_the_same_weights_as_the_straight_run(tmp_path):
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert main(["train", *lm_args(straight)]) == 0
    # Interrupted after step 3, between two checkpoints (every 2 steps); dropout is on in GPT-2,
    # so the RNG state must come back too.
    cfg = TrainConfig(**{**json.loads((straight / "config.json").read_text()), "out": str(broken)})
    assert train.run(cfg, stop_after=3)["stopped_at"] == 3
    assert main(["train", "--resume", str(broken)]) == 0
    a = load_file(sorted((straight / "checkpoints").iterdir())[-1] / "model.safetensors")
    b = load_file(sorted((broken / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a = (straight / "metrics.csv").read_text().splitlines()
    rows_b = (broken / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in rows_a] == [r.split(",")[:5] for r in rows_b]


def test_a_damaged_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = TrainConfig(**{**vars(TrainConfig()), **{"task": "lm", "effective_batch": 6, "micro_batch": 4, "epochs": 2,
                         "max_length": 24, "train_limit": 20, "eval_limit": 8, "save_every": 1, "out": str(out)}})
    train.run(cfg, stop_after=2)
    newest = sorted((out / "checkpoints").iterdir())[-1]
    data = (newest / "state.pt").read_bytes()
    (newest / "state.pt").write_bytes(data[: len(data) // 2])
    assert main(["train", "--resume", str(out)]) == 0
    assert "is damaged" in capsys.readouterr().err


def test_resume_without_checkpoint_and_fresh_run_over_old_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    assert main(["train", "--resume", str(out)]) == 2
    assert "no config.json" in capsys.readouterr().err
    # A finished run's directory is reused with a notice; an unfinished one is kept and refused.
    args = ["train", "--task", "lm", "--effective-batch", "4", "--micro-batch", "2", "--max-length", "16",
            "--train-limit", "8", "--eval-limit", "4", "--epochs", "1", "--out", str(out)]
    assert main(args) == 0 and main(args) == 0
    assert "replacing the finished run" in capsys.readouterr().out
    unfinished = tmp_path / "unfinished"
    train.run(TrainConfig(**{**json.loads((out / "config.json").read_text()), "out": str(unfinished)}), stop_after=1)
    assert main([*args[:-1], str(unfinished)]) == 2
    assert "unfinished run" in capsys.readouterr().err and any((unfinished / "checkpoints").iterdir())


def test_class_weights_count_the_weights_as_items(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--class-weights", "balanced", "--effective-batch", "12", "--micro-batch", "5",
                 "--label-smoothing", "0.2", "--epochs", "1", "--max-steps", "2", "--out", str(out), *TINY[:4]]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["class_weights"] == "balanced" and summary["label_smoothing"] == 0.2
    assert train.class_weights([0, 0, 0, 1, 2], 3, "balanced").tolist() == pytest.approx([5 / 9, 5 / 3, 5 / 3])
    with (out / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(float(r["num_items"]) != 12 for r in rows)  # a window's items are its weights' sum


def test_lm_recipe_gradient_equals_the_big_batch():
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config).eval()  # dropout off: one function for both sides
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 50, (int(n),), generator=g).tolist() for n in torch.randint(3, 30, (10,), generator=g)]
    batcher = Batcher(seqs, [], pad_id=0, task="lm")
    micro = list(batcher.micro_batches(list(range(10)), [4, 4, 2]))
    assert len({mb["input_ids"].shape[1] for mb in micro}) > 1
    work = copy.deepcopy(model)
    opt = RecordingSGD(work.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(work, opt, steps=3)
    for window in acc.windows(micro):
        for mb in window:
            n = mb.pop("num_items")
            window.backward(work(**mb).loss, num_items=n)
        window.step()
    # Reference: every sequence in one padded batch, float64, summed token losses / tokens.
    ref = copy.deepcopy(model).double()
    big = batcher.collate(list(range(10)))
    logits = ref(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits[:, :-1]
    target = big["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), target.reshape(-1), ignore_index=-100, reduction="sum")
    (loss / (target != -100).sum()).backward()
    want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in ref.parameters()]
    assert rel_error(opt.seen[0], want) < 1e-5


def test_verify_command_on_the_train_model(capsys):
    code = main(["verify", "--task", "lm", "--effective-batch", "6", "--micro-batch", "2", "--max-length", "24"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "eval(): exact" in out and "train(): NOT exact" in out and "randomness" in out


def test_condition_task_keeps_the_most_frequent_conditions(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--task", "condition", "--num-conditions", "3", "--epochs", "1", "--effective-batch", "8",
                 "--micro-batch", "4", "--out", str(out), "--train-limit", "60", "--eval-limit", "40",
                 "--max-length", "32"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert len(s["labels"]) == 3 and "Birth Control" in s["labels"]
    assert s["baseline"]["kind"] == "majority class"
