"""``gradaccum.pipeline.ExactLoss`` and ``clip_grad_norm_`` in one process: what a schedule
would do with them, against the float64 big batch, and what they refuse."""

from __future__ import annotations

import pytest
import torch

from support import pipeline as pp
from support.reference import rel_error


def _exact(**kw):
    from gradaccum.pipeline import ExactLoss

    return ExactLoss(pp.token_mean, lambda y: (y != -100).sum(), **kw)


def test_micro_batches_weighed_by_their_share_give_the_big_batch_gradient():
    front, back = pp.stages()
    ids, target = pp.step_data(0, 0)
    exact = _exact()
    exact.open(target)
    for chunk in range(3):  # as a schedule calls loss_fn: each micro-batch, backward at once
        rows = slice(2 * chunk, 2 * chunk + 2)
        exact(back(front(ids[rows])), target[rows]).backward()
    got = [p.grad for p in list(front.parameters()) + list(back.parameters())]
    f64, b64 = (m.double() for m in pp.stages())
    loss = pp.token_mean(b64(f64(ids)), target)
    loss.backward()
    assert rel_error(got, [p.grad for p in list(f64.parameters()) + list(b64.parameters())]) < 1e-6
    assert exact.close() == pytest.approx(float(loss.detach()), rel=1e-6)


def test_a_loss_before_the_step_is_counted_or_a_step_without_items_is_refused():
    exact = _exact()
    ids, target = pp.step_data(0, 0)
    logits = torch.zeros(*ids.shape, pp.VOCAB)
    with pytest.raises(RuntimeError, match=r"exact.open\(target\).*exact.windows\(batches, engine\)"):
        exact(logits, target)
    with pytest.raises(ValueError, match="no items to learn from"):
        exact.open(torch.full_like(target, -100))


def test_clip_grad_norm_in_one_process_is_torchs():
    from gradaccum.pipeline import clip_grad_norm_

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    a(x).pow(2).sum().backward()
    b(x).pow(2).sum().backward()
    norm = clip_grad_norm_(a.parameters(), 0.5)
    assert float(norm) == pytest.approx(float(torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)), rel=1e-6)
    assert rel_error([p.grad for p in a.parameters()], [p.grad for p in b.parameters()]) < 1e-6
