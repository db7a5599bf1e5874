"""verify(), BatchNorm under accumulation, learning-rate scaling: against independent references."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from gradaccum.nn import WindowBatchNorm, convert_batchnorm


def net(bn=False, dropout=0.0):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 12)]
    if bn:
        layers.append(torch.nn.BatchNorm1d(12))
    layers += [torch.nn.Tanh(), torch.nn.Dropout(dropout), torch.nn.Linear(12, 3)]
    return torch.nn.Sequential(*layers)


def data(n=16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_verify_exact_model_and_nothing_changes():
    model = net()
    x, y = data()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    report = gradaccum.verify(model, lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y), steps=4)
    assert report.exact and report.max_rel_error < 1e-5 and report.causes == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


def test_verify_finds_batchnorm_and_leaves_its_buffers_alone():
    model = net(bn=True)
    x, y = data()
    before = copy.deepcopy(model.state_dict())
    report = gradaccum.verify(model, lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y), steps=4)
    assert not report.exact and report.max_rel_error > 1e-3
    assert any("BatchNorm" in c and "1" in c for c in report.causes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_verify_finds_dropout_a_sum_loss_and_unused_parameters():
    model = net(dropout=0.5)
    x, y = data()
    r = gradaccum.verify(model, lambda b: F.cross_entropy(model(b[0]), b[1]), (x, y))
    assert any("randomness" in c for c in r.causes)

    model = net()
    r = gradaccum.verify(model, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="sum"), (x, y))
    assert not r.exact and any("sum over samples" in c for c in r.causes)

    model = torch.nn.ModuleDict({"body": net(), "extra": torch.nn.Linear(2, 2)})
    r = gradaccum.verify(model, lambda b: F.cross_entropy(model["body"](b[0]), b[1]), (x, y))
    assert any("no gradient" in c and "extra.weight" in c for c in r.causes)


def test_accumulating_a_batchnorm_model_warns():
    model = net(bn=True)
    with pytest.warns(UserWarning, match="BatchNorm"):
        gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)


def test_window_batchnorm_running_stats_equal_one_big_batch_forward():
    torch.manual_seed(3)
    big_bn = torch.nn.BatchNorm2d(5, momentum=0.3).double()
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(5, momentum=0.3))
    convert_batchnorm(model, to="window")
    assert isinstance(model[0], WindowBatchNorm)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=3)
    xs = [torch.randn(n, 5, 4, 4) * 3 + 1 for n in (2, 5, 3, 4, 1, 2)]
    for w, window in enumerate(acc.windows(xs)):
        for x in window:
            window.backward(model(x).pow(2).mean(), num_items=x.shape[0])
        window.step()
        big_bn.train()
        big_bn(torch.cat(xs[3 * w : 3 * w + 3]).double())  # the reference: one forward of the window
        torch.testing.assert_close(model[0].running_mean.double(), big_bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model[0].running_var.double(), big_bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(model[0].num_batches_tracked) == 2


def test_convert_to_groupnorm_has_no_batch_statistics():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3), torch.nn.BatchNorm2d(4))
    convert_batchnorm(model, to="groupnorm")
    assert [m.num_groups for m in model if isinstance(m, torch.nn.GroupNorm)] == [8, 2]
    x = torch.randn(8, 1, 8, 8)
    loss_fn = lambda b: model(b).pow(2).mean()  # noqa: E731
    assert gradaccum.verify(model, loss_fn, x, steps=4).exact


@pytest.mark.parametrize("rule,expected", [("linear", 4e-4), ("sqrt", 2e-4), ("none", 1e-4)])
def test_scale_lr(rule, expected):
    assert gradaccum.scale_lr(1e-4, base_batch=32, effective_batch=128, rule=rule) == pytest.approx(expected)


def test_scale_lr_bad_input():
    with pytest.raises(ValueError, match="rule must be"):
        gradaccum.scale_lr(1e-4, 32, 64, rule="cubic")
    with pytest.raises(ValueError, match="base_batch must be"):
        gradaccum.scale_lr(1e-4, 0, 64)


def test_lr_scaling_in_the_train_command(tmp_path):
    pytest.importorskip("transformers")
    import json

    from gradaccum.cli import main

    out = tmp_path / "run"
    assert main(["train", "--task", "lm", "--lr", "1e-4", "--base-batch", "2", "--effective-batch", "8",
                 "--micro-batch", "4", "--lr-scaling", "sqrt", "--max-steps", "1", "--max-length", "16",
                 "--train-limit", "8", "--eval-limit", "4", "--warmup", "0", "--out", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["lr"] == pytest.approx(2e-4)  # 1e-4 * sqrt(8 / 2)
    first = (out / "metrics.csv").read_text().splitlines()[1].split(",")
    assert float(first[4]) == pytest.approx(2e-4)  # the rate the first update used
