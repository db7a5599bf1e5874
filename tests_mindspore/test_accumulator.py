"""gradaccum.mindspore against a float64 big batch computed by hand in numpy.

The model is a token-level classifier (embedding -> dense -> softmax over the vocabulary),
small enough that its big-batch gradient can be written out in numpy: the reference shares
no code with MindSpore or with the accumulator.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

from gradaccum.mindspore import Accumulator

from reference import SIZES, Setup, initial_weights, micro_batches, reference_grad, reference_loss, rel_err, sgd

HERE = os.path.dirname(os.path.abspath(__file__))


def feed(setup, acc, batches, weighted=True):
    results = []
    for b in batches:
        loss, grads = setup.grads(b)
        results.append(acc(grads, num_items=int(b[2].sum()) if weighted else None, loss=loss))
    return results


@pytest.mark.parametrize("steps", [3, 2, 7])
def test_token_weighted_windows_equal_the_big_batch(steps):
    w0 = initial_weights()
    batches = micro_batches(SIZES)
    s = Setup(w0)
    acc = Accumulator(s.opt, steps=steps)
    updates = feed(s, acc, batches)
    flushed = acc.flush()
    # The reference: one big batch per window, one SGD step each, float64.
    ref = dict(w0)
    windows = [batches[i:i + steps] for i in range(0, len(batches), steps)]
    for win in windows:
        ref = sgd(ref, reference_grad(ref, win))
    assert sum(updates) + int(flushed) == len(windows)
    assert flushed == (len(batches) % steps != 0)
    err = rel_err({k: s.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0})
    assert err < 1e-5, err


def test_last_report_is_the_windows_item_weighted_loss():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:3])
    s = Setup(w0)
    acc = Accumulator(s.opt, steps=3)
    assert feed(s, acc, batches) == [False, False, True]
    r = acc.last_report
    assert r.step == 1 and r.micro_batches == 3 and not r.skipped
    assert r.num_items == sum(b[2].sum() for b in batches)
    assert r.loss == pytest.approx(reference_loss(w0, batches), rel=1e-5)
    g = reference_grad(w0, batches)
    assert r.grad_norm == pytest.approx(sum(float(np.sum(v ** 2)) for v in g.values()) ** 0.5, rel=1e-5)


def test_the_seeds_accumulator_is_off_so_the_reference_can_fail():
    """Summing raw micro-batch gradients (the seeds' class) is far from the big batch here."""
    w0 = initial_weights()
    batches = micro_batches(SIZES[:3])
    s = Setup(w0)
    summed = [sum(g) for g in zip(*[[t.asnumpy().astype(np.float64) for t in s.grads(b)[1]] for b in batches])]
    ref = reference_grad(w0, batches)
    assert rel_err(dict(zip("EWb", summed)), ref) > 0.5
    mean_of_means = {k: v / 3 for k, v in zip("EWb", summed)}
    assert rel_err(mean_of_means, ref) > 0.05  # dividing by k is not enough with uneven sizes


def test_unweighted_partial_window_is_a_mean_of_its_micro_batches():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:2])
    s = Setup(w0)
    acc = Accumulator(s.opt, steps=4)
    assert feed(s, acc, batches, weighted=False) == [False, False]
    assert acc.flush() is True and acc.flush() is False
    # Each micro-batch's own mean gradient, computed one at a time, then averaged.
    g = [reference_grad(w0, [b]) for b in batches]
    ref = sgd(w0, {k: (g[0][k] + g[1][k]) / 2 for k in w0})
    assert rel_err({k: s.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0}) < 1e-5
    assert acc.last_report.num_items is None and acc.last_report.micro_batches == 2


def test_clipping_applies_to_the_windows_gradient():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:3])
    g = reference_grad(w0, batches)
    norm = sum(float(np.sum(v ** 2)) for v in g.values()) ** 0.5
    s = Setup(w0)
    acc = Accumulator(s.opt, steps=3, max_grad_norm=0.25 * norm)
    feed(s, acc, batches)
    ref = sgd(w0, {k: v * 0.25 for k, v in g.items()})
    assert rel_err({k: s.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0}) < 1e-5
    assert acc.last_report.grad_norm == pytest.approx(norm, rel=1e-5)


def test_a_non_finite_window_is_skipped_and_training_goes_on():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:4])
    s = Setup(w0)
    before = s.weights()
    acc = Accumulator(s.opt, steps=2)
    loss, grads = s.grads(batches[0])
    poisoned = tuple(ops.fill(g.dtype, g.shape, float("nan")) if i == 1 else g for i, g in enumerate(grads))
    assert acc(poisoned, num_items=3) is False
    _, grads = s.grads(batches[1])
    assert acc(grads, num_items=4) is False
    assert acc.last_report.skipped and acc.last_report.step == 1
    assert all(np.array_equal(s.weights()[k], before[k]) for k in w0)
    assert feed(s, acc, batches[2:]) == [False, True]
    ref = sgd(w0, reference_grad(w0, batches[2:]))
    assert rel_err({k: s.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0}) < 1e-5


def test_learning_rate_schedule_advances_once_per_update():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:6])
    s = Setup(w0)
    acc = Accumulator(s.opt, steps=3)
    feed(s, acc, batches)
    assert int(s.opt.global_step.asnumpy().reshape(-1)[0]) == 2


@pytest.mark.parametrize("bad,error", [(0, ValueError), (-1, ValueError), (1.5, TypeError), ("4", TypeError),
                                       (None, TypeError), (True, TypeError), (lambda step: 4, TypeError)])
def test_bad_steps_are_refused(bad, error):
    s = Setup(initial_weights())
    with pytest.raises(error, match="steps"):
        Accumulator(s.opt, steps=bad)


def test_bad_calls_say_what_is_accepted():
    s = Setup(initial_weights())
    acc = Accumulator(s.opt, steps=3)
    _, grads = s.grads(micro_batches(SIZES[:1])[0])
    with pytest.raises(ValueError, match="num_items"):
        acc(grads, num_items=0)
    with pytest.raises(ValueError, match="gradients"):
        acc(grads[:2], num_items=3)
    acc(grads, num_items=3)
    with pytest.raises(ValueError, match="for every micro-batch"):
        acc(grads)
    with pytest.raises(ValueError, match="max_grad_norm"):
        Accumulator(s.opt, steps=2, max_grad_norm=-1.0)
    with pytest.raises(TypeError, match="optimizer"):
        Accumulator(object(), steps=2)


def test_mid_window_resume_equals_the_straight_run():
    w0 = initial_weights()
    batches = micro_batches(SIZES)
    straight = Setup(w0, optimizer="adam")
    acc = Accumulator(straight.opt, steps=3)
    feed(straight, acc, batches)
    acc.flush()

    first = Setup(w0, optimizer="adam")
    acc1 = Accumulator(first.opt, steps=3)
    feed(first, acc1, batches[:4])  # one window done, one micro-batch into the next
    blob = pickle.dumps({"acc": acc1.state_dict(),
                         "params": {p.name: p.asnumpy() for p in first.opt.parameters},
                         "opt": {p.name: p.asnumpy() for p in first.opt.get_parameters()}})
    del first, acc1

    saved = pickle.loads(blob)
    resumed = Setup(w0, optimizer="adam")
    for p in resumed.opt.get_parameters():  # optimizer moments, step counters and weights
        if p.name in saved["opt"]:
            p.set_data(ms.Tensor(saved["opt"][p.name]))
    acc2 = Accumulator(resumed.opt, steps=3)
    acc2.load_state_dict(saved["acc"])
    assert acc2.state.micro_batches == 1 and acc2.state.optimizer_step == 1
    feed(resumed, acc2, batches[4:])
    acc2.flush()
    for k in w0:
        np.testing.assert_array_equal(resumed.weights()[k], straight.weights()[k])
    assert acc2.last_report.step == acc.last_report.step == 3


def test_restoring_into_another_network_is_refused():
    s = Setup(initial_weights())
    state = Accumulator(s.opt, steps=2).state_dict()
    state["parameters"] = {"accum_.other": np.zeros(3)}
    with pytest.raises(ValueError, match="other parameters"):
        Accumulator(Setup(initial_weights()).opt, steps=2).load_state_dict(state)


def test_jit_compiled_gradients_give_the_same_update():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:5])
    s = Setup(w0, jit=True)
    acc = Accumulator(s.opt, steps=5)
    feed(s, acc, batches)
    ref = sgd(w0, reference_grad(w0, batches))
    assert rel_err({k: s.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0}) < 1e-5


def test_graph_mode_in_a_fresh_process():
    """GRAPH_MODE is process-wide, so it runs in its own interpreter."""
    code = (
        "import mindspore as ms; ms.set_context(mode=ms.GRAPH_MODE)\n"
        "import sys; sys.path.insert(0, %r)\n"
        "import test_accumulator as t\n"
        "t.test_token_weighted_windows_equal_the_big_batch(3)\n"
        "print('graph ok')\n"
    ) % HERE
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "graph ok" in out.stdout


def test_import_needs_no_torch():
    code = "import sys, gradaccum.mindspore; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"
