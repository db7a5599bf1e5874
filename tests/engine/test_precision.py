"""Low precision: bf16 parameters with accum_dtype, fp16 with GradScaler, bf16 autocast."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from support.reference import RecordingSGD, TinyLM, big_batch_lm_grads, lm_mean_loss, make_sequences, rel_error


def mlp(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 10)).to(dtype)


def test_accum_dtype_float32_at_least_halves_the_bf16_summation_error():
    k = 64
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 32, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(k)]
    base = mlp(torch.bfloat16)

    # The float64 sum of the very micro-batch gradients the accumulator will see: each one
    # computed alone in bf16 (with the same 1/64 weight, a power of two, so exact).
    probe = copy.deepcopy(base)
    want = [torch.zeros_like(p, dtype=torch.float64) for p in probe.parameters()]
    for x, y in data:
        probe.zero_grad(set_to_none=True)
        (F.cross_entropy(probe(x.bfloat16()), y) / k).backward()
        for w, p in zip(want, probe.parameters()):
            w += p.grad.double()

    errors = {}
    for accum_dtype in (None, torch.float32):
        model = copy.deepcopy(base)
        opt = RecordingSGD(model.parameters(), lr=0.0)
        acc = gradaccum.Accumulator(model, opt, steps=k, accum_dtype=accum_dtype)
        for window in acc.windows(data):
            for x, y in window:
                window.backward(F.cross_entropy(model(x.bfloat16()), y))
            window.step()
        got = opt.seen[0]
        assert all(t.dtype == torch.bfloat16 for t in got)
        errors[accum_dtype] = rel_error(got, want)
    print("accum error bf16-sum %.3g, fp32-sum %.3g" % (errors[None], errors[torch.float32]))
    assert errors[torch.float32] <= 0.5 * errors[None], errors


def test_fp16_grad_scaler_unscales_before_clipping_and_matches_the_big_batch():
    torch.manual_seed(2)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=3, precision="fp16", max_grad_norm=0.05)
    assert acc.scaler is not None and acc.scaler.get_scale() > 1000
    mbs = [make_sequences(n, seed=10 + n) for n in (3, 1, 4)]
    for window in acc.windows(mbs):
        for seqs in window:
            assert not torch.is_autocast_enabled("cpu"), "autocast only around the forward"
            with window.autocast():
                assert torch.is_autocast_enabled("cpu")
                loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n)
        want = big_batch_lm_grads(model, mbs)
        report = window.step()
    norm = math.sqrt(sum(float(w.pow(2).sum()) for w in want))
    assert norm > 0.05
    # The reported norm is of the true gradient, not of the scaled one (~65536x larger).
    assert report.grad_norm == pytest.approx(norm, rel=5e-3)
    clipped = [w * (0.05 / norm) for w in want]
    assert rel_error(opt.seen[0], clipped) < 5e-3


def test_fp16_overflow_skips_the_update_and_backs_the_scale_off():
    torch.manual_seed(3)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=2, precision="fp16")
    mbs = [make_sequences(3, seed=s) for s in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    scale0 = acc.scaler.get_scale()
    reports = []
    for i, window in enumerate(acc.windows(mbs)):
        for seqs in window:
            with window.autocast():
                loss, n = lm_mean_loss(model, seqs)
            window.backward(loss * (1e6 if i == 0 else 1.0), num_items=n)
        if i == 0:
            reports.append(window.step())
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        else:
            want = big_batch_lm_grads(model, mbs[2:])
            reports.append(window.step())
            assert rel_error(opt.seen[-1], want) < 5e-3
    assert reports[0].skipped and not reports[1].skipped
    assert acc.scaler.get_scale() < scale0
    assert len(opt.seen) == 1


def test_bf16_autocast_variable_lengths_close_to_the_float64_big_batch():
    torch.manual_seed(4)
    model = TinyLM(dim=32)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=4, precision="bf16")
    mbs = [make_sequences(n, seed=20 + n, lo=2, hi=40) for n in (1, 5, 3, 7)]
    for window in acc.windows(mbs):
        for seqs in window:
            with window.autocast():
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16
                loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n)
        window.step()
    assert not torch.is_autocast_enabled("cpu"), "autocast must not leak out of the window"
    want = big_batch_lm_grads(model, mbs)
    err = rel_error(opt.seen[0], want)
    # bf16 rounding stays near 1%; dividing by k instead would be off by far more.
    model.zero_grad()
    for seqs in mbs:
        (lm_mean_loss(model, seqs)[0] / 4).backward()
    naive = rel_error([p.grad for p in model.parameters()], want)
    assert err < 0.02 and naive > 5 * err, (err, naive)
