"""compact_embedding_grads: embedding gradients held as rows between micro-batches.

Checked against the float64 big batch and, bit for bit, against the same run holding
dense gradients.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradaccum
from support.reference import RecordingSGD, TinyLM, big_batch_lm_grads, lm_mean_loss, micro_batches, rel_error


# 500 rows, of which the sequences use at most 37: the held rows are a small part.
def lm(vocab: int = 500) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(vocab=vocab)


def run(model, batches, k, compact, use_forward_backward=False, probe=None):
    opt = RecordingSGD(model.parameters(), lr=0.5)
    acc = gradaccum.Accumulator(model, opt, steps=k, compact_embedding_grads=compact)
    for window in acc.windows(batches):
        for j, mb in enumerate(window):
            if use_forward_backward:
                window.forward_backward(mb, lambda b: lm_mean_loss(model, b))
            else:
                loss, n = lm_mean_loss(model, mb)
                window.backward(loss, num_items=n)
            if probe is not None:
                probe(j, window, model)
        window.step()
    return opt.seen, model


@pytest.mark.parametrize("use_forward_backward", [False, True])
def test_bit_for_bit_the_dense_run_and_the_big_batch(use_forward_backward):
    sizes = [3, 1, 4, 2, 2, 5, 1]  # windows of 3, 3 and a partial 1
    batches = micro_batches(sizes, seed=4)
    start = lm()
    held = []

    def probe(j, window, model):
        if j < window.planned - 1:
            held.append(model.emb.weight.grad)

    seen_c, _ = run(copy.deepcopy(start), batches, 3, True, use_forward_backward, probe)
    seen_d, _ = run(copy.deepcopy(start), batches, 3, False, use_forward_backward)
    # The two full windows' first two micro-batches (the partial last window has one, its last).
    assert len(held) == 5 and all(g is None for g in held[:4])
    assert len(seen_c) == len(seen_d) == 3
    for a, b in zip(seen_c, seen_d):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    want = big_batch_lm_grads(start, batches[:3])
    assert rel_error(seen_c[0], want) < 1e-6


def test_mid_window_state_resumes_into_a_dense_accumulator():
    batches = micro_batches([3, 1, 4, 2, 2, 5], seed=4)
    straight_seen, straight = run(lm(), batches, 3, False)

    model = lm()
    opt = RecordingSGD(model.parameters(), lr=0.5)
    acc = gradaccum.Accumulator(model, opt, steps=3, compact_embedding_grads=True)
    windows = acc.windows(batches[:4])
    for _ in range(2):  # one window, then one micro-batch into the next
        window = next(windows)
        for mb in window:
            loss, n = lm_mean_loss(model, mb)
            window.backward(loss, num_items=n)
            if acc.state.micro_batches == 1 and acc.state.optimizer_step == 1:
                break
        else:
            window.step()
    saved = copy.deepcopy({"model": model.state_dict(), "acc": acc.state_dict()})
    assert saved["acc"]["state"]["micro_batches"] == 1

    model2 = lm()
    model2.load_state_dict(saved["model"])
    opt2 = RecordingSGD(model2.parameters(), lr=0.5)
    acc2 = gradaccum.Accumulator(model2, opt2, steps=3)
    acc2.load_state_dict(saved["acc"])
    for window in acc2.windows(batches[4:]):
        for mb in window:
            loss, n = lm_mean_loss(model2, mb)
            window.backward(loss, num_items=n)
        window.step()
    assert all(torch.equal(a, b) for a, b in zip(opt2.seen[-1], straight_seen[-1]))
    assert all(torch.equal(a, b) for a, b in zip(model2.parameters(), straight.parameters()))


def test_mostly_dense_gradients_stay_dense():
    """A small vocabulary where each micro-batch touches most rows: nothing to gain, kept dense."""
    batches = micro_batches([6, 6], seed=4)
    seen = []
    run(lm(vocab=37), batches, 2, True, probe=lambda j, w, m: seen.append(m.emb.weight.grad is not None))
    assert seen[0] is True


def test_compact_rows_record_only_inside_their_window_loop():
    # The lookup hooks outlive a loop: forwards outside it (evaluation, another accumulator)
    # must not pile up in this accumulator's store.
    torch.manual_seed(0)
    model = TinyLM()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2,
                                compact_embedding_grads=True)
    store = acc.stores.held_elsewhere[0]
    for _ in range(5):
        model(torch.randint(0, 37, (4, 9))).sum().backward()
    assert all(not ids for ids in store.ids.values())
