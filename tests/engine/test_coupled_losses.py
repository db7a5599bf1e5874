"""Coupled losses (in-batch negatives) through window.encode / backward_encoded.

Reference: the float64 gradient of InfoNCE over the whole window as one big batch (every
pair scored against every other pair of the window), computed by ``coupled.big_batch_grads``
with the graph kept and no accumulation at all. With dropout on, the reference runs the
same micro-batches in the same order with the graph kept, so the same random draws happen.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradaccum
from support.coupled import BiEncoder, big_batch_grads, info_nce, pair_batches
from support.reference import RecordingSGD, rel_error


def windows_of(batches, k):
    return [batches[i:i + k] for i in range(0, len(batches), k)]


def run_cached(model, batches, k, precision="fp32", max_grad_norm=None, scaler=False, split=None):
    """Train with cached accumulation; return the gradients handed to the optimizer."""
    opt = RecordingSGD(model.parameters(), lr=0.0)
    kw = {"precision": precision, "max_grad_norm": max_grad_norm}
    acc = gradaccum.Accumulator(model, opt, steps=k, **kw)
    for window in acc.windows(batches):
        reps = [window.encode(model, b) for b in window]
        q = torch.cat([r[0] for r in reps])
        d = torch.cat([r[1] for r in reps])
        window.backward_encoded(info_nce(q, d, model.log_scale))
        report = window.step()
        assert not report.skipped
    return opt.seen


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_equals_the_float64_big_batch_for_every_window_size(k):
    sizes = [3, 5, 2, 4, 6, 2, 3, 4, 5, 2, 3]  # uneven micro-batches; 11 of them: a partial last window
    batches = pair_batches(sizes)
    torch.manual_seed(0)
    model = BiEncoder()
    start = copy.deepcopy(model)
    seen = run_cached(model, batches, k)
    wins = windows_of(batches, k)
    assert len(seen) == len(wins)
    for got, window_batches in zip(seen, wins):  # lr 0: every window sees the starting weights
        want = big_batch_grads(start, window_batches)
        assert rel_error(got, want) < 1e-5, rel_error(got, want)


def test_plain_accumulation_is_not_the_big_batch():
    """The check can fail: per-micro-batch negatives give another gradient."""
    batches = pair_batches([4, 4, 4, 4])
    torch.manual_seed(0)
    model = BiEncoder()
    want = big_batch_grads(model, batches)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=4)
    for window in acc.windows(batches):
        for b in window:
            q, d = model(b)
            window.backward(info_nce(q, d, model.log_scale), num_items=len(q))
        window.step()
    assert rel_error(opt.seen[0], want) > 0.05


def test_two_towers_and_dict_outputs():
    batches = pair_batches([3, 5, 4])
    torch.manual_seed(1)
    model = BiEncoder(towers=2)
    want = big_batch_grads(model, batches)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=3)
    for window in acc.windows(batches):
        reps = [window.encode(lambda b: dict(zip("qd", model(b))), b) for b in window]
        loss = info_nce(torch.cat([r["q"] for r in reps]), torch.cat([r["d"] for r in reps]), model.log_scale)
        window.backward_encoded(loss)
        window.step()
    assert rel_error(opt.seen[0], want) < 1e-5


def test_dropout_equals_the_same_draws_with_the_graph_kept():
    batches = pair_batches([4, 3, 5, 4], seed=2)
    torch.manual_seed(3)
    model = BiEncoder(dropout=0.3)
    ref = copy.deepcopy(model)
    torch.manual_seed(11)
    q, d = zip(*[ref(b) for b in batches])  # the same micro-batches, same order, graph kept
    info_nce(torch.cat(q), torch.cat(d), ref.log_scale).backward()
    want = [p.grad.clone() for p in ref.parameters()]
    after_reference = torch.rand(1)

    torch.manual_seed(11)
    got = run_cached(model, batches, k=4)[0]
    assert rel_error(got, want) < 1e-5
    # The RNG continues where the reference's did, so the rest of a run draws the same numbers.
    assert torch.equal(torch.rand(1), after_reference)
    # Without restoring the RNG state the masks would differ: the check can fail.
    torch.manual_seed(11)
    other = BiEncoder(dropout=0.3)
    other.load_state_dict(ref.state_dict())
    q2, d2 = zip(*[other(b) for b in batches[::-1]])
    other.zero_grad()
    info_nce(torch.cat(q2[::-1]), torch.cat(d2[::-1]), other.log_scale).backward()
    assert rel_error([p.grad for p in other.parameters()], want) > 1e-3


@pytest.mark.parametrize("precision, tol", [("bf16", 3e-2), ("fp16", 5e-3)])
def test_low_precision(precision, tol):
    batches = pair_batches([4, 6, 3, 5])
    torch.manual_seed(0)
    model = BiEncoder()
    want = big_batch_grads(model, batches)
    got = run_cached(model, batches, k=4, precision=precision)[0]
    assert rel_error(got, want) < tol


def test_clipping_clips_the_big_batch_gradient():
    batches = pair_batches([4, 6, 3, 5])
    torch.manual_seed(0)
    model = BiEncoder()
    want = big_batch_grads(model, batches)
    norm = sum(float(w.pow(2).sum()) for w in want) ** 0.5
    clip = norm / 3
    got = run_cached(model, batches, k=4, max_grad_norm=clip)[0]
    assert rel_error(got, [w * (clip / norm) for w in want]) < 1e-5


def test_state_dict_between_windows_resumes_exactly():
    batches = pair_batches([3, 4, 5, 2, 4, 3])
    torch.manual_seed(0)
    straight = BiEncoder()
    resumed = copy.deepcopy(straight)

    def train(model, acc, data):
        for window in acc.windows(data):
            reps = [window.encode(model, b) for b in window]
            window.backward_encoded(info_nce(torch.cat([r[0] for r in reps]), torch.cat([r[1] for r in reps]), model.log_scale))
            window.step()

    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    train(straight, gradaccum.Accumulator(straight, opt, steps=2), batches)

    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    acc = gradaccum.Accumulator(resumed, opt, steps=2)
    train(resumed, acc, batches[:2])
    saved = copy.deepcopy((acc.state_dict(), opt.state_dict(), resumed.state_dict()))
    model2 = BiEncoder()
    model2.load_state_dict(saved[2])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    acc2 = gradaccum.Accumulator(model2, opt2, steps=2)
    acc2.load_state_dict(saved[0])
    train(model2, acc2, batches[2:])
    for a, b in zip(straight.parameters(), model2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_misuse_is_a_clear_error():
    batches = pair_batches([3, 3])
    model = BiEncoder()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    for window in acc.windows(batches):
        it = iter(window)
        b = next(it)
        q, d = model(b)
        window.backward(info_nce(q, d, model.log_scale))
        with pytest.raises(RuntimeError, match="not both"):
            window.encode(model, next(it))
        window.step()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    for window in acc.windows(batches):
        it = iter(window)
        reps = [window.encode(model, next(it))]
        with pytest.raises(RuntimeError, match="encode every micro-batch"):
            window.backward_encoded(info_nce(*reps[0], model.log_scale))
        with pytest.raises(RuntimeError, match="not both"):
            window.backward(model(next(it))[0].sum())
        with pytest.raises(RuntimeError, match="cached representations cannot be saved"):
            acc.state_dict()
        with pytest.raises(RuntimeError, match="without window.backward_encoded"):
            window.step()
        break


@pytest.mark.multiprocess
def test_ddp_negatives_span_all_ranks_and_equal_the_single_process_big_batch(tmp_path):
    """Rank 1 has fewer micro-batches (it stands in), sizes differ, the last window is partial."""
    from support import dist_workers

    sizes = [[3, 4, 5, 2, 4], [4, 2, 3]]
    k = 2
    results = dist_workers.spawn(dist_workers.cached_info_nce, 2, tmp_path, sizes, k)
    assert all(r.get("message") is None for r in results), results
    torch.manual_seed(0)
    model = BiEncoder()
    data = [pair_batches(s, seed=100 + r) for r, s in enumerate(sizes)]
    n_windows = -(-max(len(s) for s in sizes) // k)
    for w in range(n_windows):
        # One global batch: rank 0's micro-batches of the window, then rank 1's.
        window_batches = [b for r in range(2) for b in data[r][w * k:(w + 1) * k]]
        want = big_batch_grads(model, window_batches)
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5, (w, rel_error(r["seen"][w], want))
    for r in results:
        assert r["gradient_all_reduces"] == n_windows  # one gradient all-reduce per optimizer step
    assert results[1]["stand_ins"] == [0, 1, 1]
    assert results[0]["losses"] == pytest.approx(results[1]["losses"])


@pytest.mark.multiprocess
def test_ddp_without_gather_is_refused(tmp_path):
    from support import dist_workers

    results = dist_workers.spawn(dist_workers.cached_info_nce, 2, tmp_path, [[3, 3], [3, 3]], 2, False)
    assert all("window.gather()" in r["message"] for r in results), results
