"""The engine against independent float64 big-batch references."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from support.reference import (
    RecordingSGD,
    TinyLM,
    big_batch_lm_grads,
    f64_grads,
    lm_mean_loss,
    make_sequences,
    rel_error,
)


def chunks(items, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(items[i : i + s])
        i += s
    assert i == len(items)
    return out


def run_lm(model, opt, micro_batches, steps, weighted=True, **kw):
    """Train with the accumulator; return (reports, reference grads per window)."""
    acc = gradaccum.Accumulator(model, opt, steps=steps, **kw)
    reports, refs = [], []
    for window in acc.windows(micro_batches):
        seen = []
        for seqs in window:
            seen.append(seqs)
            loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n if weighted else None)
        refs.append(big_batch_lm_grads(model, seen) if weighted else None)
        reports.append(window.step())
    return reports, refs


@pytest.mark.parametrize("sizes,steps", [([3, 1, 5, 2, 4, 1, 2, 6], 4), ([2] * 9, 3), ([5, 1, 1, 7], 2), ([4, 4], 1)])
def test_variable_length_windows_equal_the_big_batch(sizes, steps):
    torch.manual_seed(0)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.5)
    mbs = chunks(make_sequences(sum(sizes), seed=1), sizes)
    reports, refs = run_lm(model, opt, mbs, steps)
    assert len(opt.seen) == len(refs) == math.ceil(len(sizes) / steps)
    for got, want in zip(opt.seen, refs):
        assert rel_error(got, want) < 1e-5


def test_the_comparison_can_fail_dividing_by_k_is_far_off():
    # The seeds' loop (loss / k) on the same data: the reference must tell it apart.
    torch.manual_seed(0)
    model = TinyLM()
    mbs = chunks(make_sequences(16, seed=1, lo=2, hi=40), [1, 5, 3, 7])
    model.zero_grad()
    for seqs in mbs:
        (lm_mean_loss(model, seqs)[0] / 4).backward()
    naive = [p.grad.clone() for p in model.parameters()]
    assert rel_error(naive, big_batch_lm_grads(model, mbs)) > 0.05


def test_partial_last_window_weighted():
    torch.manual_seed(1)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.3)
    mbs = chunks(make_sequences(14, seed=2), [2, 3, 1, 2, 4, 2])  # k=4: windows of 4 and 2
    reports, refs = run_lm(model, opt, mbs, steps=4)
    assert [r.micro_batches for r in reports] == [4, 2]
    for got, want in zip(opt.seen, refs):
        assert rel_error(got, want) < 1e-5
    # The reported loss is the item-weighted mean of the window (tokens predicted).
    assert reports[1].num_items == sum(len(s) - 1 for mb in mbs[4:] for s in mb)


def test_partial_last_window_unweighted_is_a_mean_not_a_fraction():
    # Equal-size classification micro-batches: each weighs the same, and a last window of
    # one micro-batch gets that micro-batch's full mean gradient, not a quarter of it.
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = RecordingSGD(model.parameters(), lr=0.2)
    x, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    mbs = [(x[i : i + 4], y[i : i + 4]) for i in range(0, 20, 4)]  # 5 micro-batches, k=4
    acc = gradaccum.Accumulator(model, opt, steps=4)
    refs = []
    for window in acc.windows(mbs):
        seen = []
        for xb, yb in window:
            seen.append((xb, yb))
            window.backward(F.cross_entropy(model(xb), yb))
        X, Y = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
        refs.append(f64_grads(model, lambda m: F.cross_entropy(m(X.double()), Y)))
        report = window.step()
        assert report.num_items is None
    assert len(opt.seen) == 2
    for got, want in zip(opt.seen, refs):
        assert rel_error(got, want) < 1e-6


def test_clipping_clips_the_accumulated_gradient_and_reports_the_norm_before():
    torch.manual_seed(3)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    mbs = chunks(make_sequences(10, seed=3), [3, 2, 5])
    reports, refs = run_lm(model, opt, mbs, steps=3, max_grad_norm=0.05)
    want = refs[0]
    norm = math.sqrt(sum(float(w.pow(2).sum()) for w in want))
    assert norm > 0.05, "the test needs a gradient above the threshold"
    assert reports[0].grad_norm == pytest.approx(norm, rel=1e-5)
    clipped = [w * (0.05 / (norm + 1e-6)) for w in want]
    assert rel_error(opt.seen[0], clipped) < 1e-5


def test_scheduler_steps_once_per_optimizer_step():
    torch.manual_seed(4)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    mbs = chunks(make_sequences(22, seed=4), [2] * 11)
    reports, _ = run_lm(model, opt, mbs, steps=4, scheduler=sched)
    assert len(reports) == 3 and sched.last_epoch == 3
    assert [r.lr for r in reports] == pytest.approx([1.0, 0.5, 1 / 3])


def test_callable_steps_schedule():
    torch.manual_seed(5)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.3)
    mbs = chunks(make_sequences(24, seed=5), [2] * 12)
    reports, refs = run_lm(model, opt, mbs, steps=lambda s: [1, 2, 3][min(s, 2)])
    assert [r.micro_batches for r in reports] == [1, 2, 3, 3, 3]
    assert [r.step for r in reports] == [1, 2, 3, 4, 5]
    for got, want in zip(opt.seen, refs):
        assert rel_error(got, want) < 1e-5


def test_steps_1_is_the_plain_loop():
    torch.manual_seed(6)
    plain = TinyLM()
    ours = copy.deepcopy(plain)
    mbs = chunks(make_sequences(15, seed=6), [4, 4, 4, 3])
    opt_a = torch.optim.AdamW(plain.parameters(), lr=1e-2)
    for seqs in mbs:
        loss, _ = lm_mean_loss(plain, seqs)
        loss.backward()
        opt_a.step()
        opt_a.zero_grad()
    opt_b = torch.optim.AdamW(ours.parameters(), lr=1e-2)
    run_lm(ours, opt_b, mbs, steps=1)
    for a, b in zip(plain.parameters(), ours.parameters()):
        assert torch.equal(a, b)


class MarkedLoss(torch.Tensor):
    """A tensor subclass, as a DTensor loss would be: it takes the engine's other backward path."""


def test_a_tensor_subclass_loss_gets_the_same_big_batch_gradient():
    torch.manual_seed(3)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    mbs = chunks(make_sequences(9, seed=3), [2, 4, 3])
    acc = gradaccum.Accumulator(model, opt, steps=3)
    for window in acc.windows(mbs):
        seen = []
        for seqs in window:
            seen.append(seqs)
            loss, n = lm_mean_loss(model, seqs)
            window.backward(loss.as_subclass(MarkedLoss), num_items=n)
        want = big_batch_lm_grads(model, seen)
        window.step()
    assert rel_error(opt.seen[0], want) < 1e-5


def test_nan_window_is_skipped_and_training_continues():
    torch.manual_seed(7)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    acc = gradaccum.Accumulator(model, opt, steps=2, scheduler=sched)
    mbs = chunks(make_sequences(8, seed=7), [2, 2, 2, 2])
    before = [p.detach().clone() for p in model.parameters()]
    reports = []
    for w_idx, window in enumerate(acc.windows(mbs)):
        seen = []
        for j, seqs in enumerate(window):
            seen.append(seqs)
            loss, n = lm_mean_loss(model, seqs)
            if w_idx == 0 and j == 1:
                loss = loss * float("nan")
            window.backward(loss, num_items=n)
        if w_idx == 0:
            rep = window.step()
            assert rep.skipped and not math.isfinite(rep.grad_norm)
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert all(p.grad is None for p in model.parameters())
            assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == 0.3
            reports.append(rep)
        else:
            ref = big_batch_lm_grads(model, seen)
            rep = window.step()
            assert not rep.skipped
            assert rel_error(opt.seen[-1], ref) < 1e-5
            assert sched.last_epoch == 1
    assert len(opt.seen) == 1


def test_state_dict_mid_window_resume_equals_the_straight_run():
    torch.manual_seed(8)
    model_a = TinyLM()
    model_b = copy.deepcopy(model_a)
    mbs = chunks(make_sequences(20, seed=8), [3, 1, 4, 2, 2, 5, 1, 2])
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    run_lm(model_a, opt_a, mbs, steps=3)

    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    acc = gradaccum.Accumulator(model_b, opt_b, steps=3)
    done = 0
    for window in acc.windows(mbs):
        for seqs in window:
            loss, n = lm_mean_loss(model_b, seqs)
            window.backward(loss, num_items=n)
            done += 1
            if done == 5:  # mid-window: 2 of 3 micro-batches of the second window
                break
        if done == 5:
            break
        window.step()
    saved = copy.deepcopy({"m": model_b.state_dict(), "o": opt_b.state_dict(), "a": acc.state_dict()})
    model_c = TinyLM()
    model_c.load_state_dict(saved["m"])
    opt_c = torch.optim.AdamW(model_c.parameters(), lr=1e-2)
    opt_c.load_state_dict(saved["o"])
    acc_c = gradaccum.Accumulator(model_c, opt_c, steps=3)
    acc_c.load_state_dict(saved["a"])
    first = True
    for window in acc_c.windows(mbs[done:]):
        for seqs in window:
            loss, n = lm_mean_loss(model_c, seqs)
            window.backward(loss, num_items=n)
        rep = window.step()
        if first:
            assert rep.micro_batches == 3
            first = False
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
