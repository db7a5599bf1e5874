"""Router load-balancing losses in your own loop and MoE layer (``gradaccum.moe.RouterLoss``
as a term): every window against an independent float64 big batch of its micro-batches,
with the load-balancing loss written out over the concatenated batch (``support.moe.reference``)."""

from __future__ import annotations

import copy

import pytest
import torch

import gradaccum
from support import dist_workers, moe
from support.reference import RecordingSGD, rel_error


def _check(net, seen, windows, tol=1e-5):
    assert len(seen) == len(windows)
    for w, (got, batches) in enumerate(zip(seen, windows)):
        err = rel_error(got, moe.reference(net, batches))
        assert err < tol, (w, err)


# bf16: the forward in bf16 routes a few tokens otherwise than the float64 reference does (6
# top-2 assignments of 116 in the last window, measured), so its tolerance is bf16's and more.
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 6e-2)])
def test_router_loss_windows_equal_the_big_batch(precision, tol):
    torch.manual_seed(0)
    net, data = moe.TinyMoE(), moe.data()  # 10 micro-batches, k = 4: windows of 4, 4 and a partial 2
    seen, reports = moe.train(copy.deepcopy(net), data, 4, precision=precision)
    _check(net, seen, [data[0:4], data[4:8], data[8:10]], tol)
    # The report: the window's router loss and its assignments per expert (top-2 of every real
    # token of both layers).
    tokens = reports[2].tokens_per_expert["router"]
    assert sum(tokens) == pytest.approx(2 * 2 * float(sum(b["mask"].sum() for b in data[8:10])))
    assert reports[2].terms["router"] > 0 and reports[2].loss == pytest.approx(sum(reports[2].terms.values()))


def test_each_micro_batch_weighing_its_own_router_loss_is_off():
    # The control: the router loss of each micro-batch computed alone and weighed like the
    # token mean (what a loop that knows no better does) misses the big batch.
    from gradaccum.moe import balance_loss, probabilities, routing

    torch.manual_seed(0)
    net, data = moe.TinyMoE(), moe.data()[:4]
    model = copy.deepcopy(net)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=4)
    for window in acc.windows(data):
        for batch in window:
            out = moe.terms(model, batch)
            logits, mask = out["router"]
            assigned, rows = routing(logits, 2, mask)
            aux = balance_loss(probabilities(logits, mask), assigned, rows, 4)
            window.backward(out["lm"][0] + moe.COEF * aux, num_items=out["lm"][1])
        window.step()
    assert rel_error([g.float() for g in opt.seen[0]], moe.reference(net, data)) > 0.01


def test_token_budget_windows():
    from gradaccum.data import TokenBudgetSampler
    from support import matrix_cells as mc
    from support.reference import make_sequences

    seqs = make_sequences(30, seed=41, lo=2, hi=24)
    sampler = TokenBudgetSampler([len(s) for s in seqs], window=6, max_tokens=50, seed=3)
    windows = [[mc.batch_of([seqs[i] for i in mb]) for mb in w] for w in sampler.windows()]
    assert len({len(w) for w in windows}) > 1
    torch.manual_seed(0)
    net = moe.TinyMoE()
    loader = torch.utils.data.DataLoader(seqs, batch_sampler=sampler, collate_fn=mc.batch_of)
    seen, _ = moe.train(copy.deepcopy(net), loader, sampler)
    _check(net, seen, windows)


def test_router_jitter_routes_alike_in_both_passes_and_a_mismatch_is_refused(monkeypatch):
    torch.manual_seed(0)
    net, data = moe.TinyMoE(jitter=0.3), moe.data()[:6]
    moe.train(copy.deepcopy(net), data, 3)  # the RNG replayed: every window applied
    from gradaccum.engine.rules import terms

    monkeypatch.setattr(terms.Terms, "before_micro_batch", lambda self, batch: None)  # no replay
    with pytest.raises(ValueError, match="routed .* differently"):
        moe.train(copy.deepcopy(net), data, 3)


@pytest.mark.multiprocess
def test_two_ranks_ddp_and_fsdp2(tmp_path):
    results = dist_workers.spawn(moe.two_ranks, 2, tmp_path)
    for r in results:
        assert "error" not in r, r.get("trace")
    torch.manual_seed(0)
    net = moe.TinyMoE()
    ranks = [moe.data(0, (3, 1, 4, 2, 5, 1)), moe.data(1, (2, 3, 1, 2))]
    windows = [ranks[0][0:3] + ranks[1][0:3], ranks[0][3:6] + ranks[1][3:4]]  # rank 1 stands in twice in window 2
    for wrap in ("ddp", "fsdp2"):
        for r in results:
            _check(net, r[wrap]["seen"], windows, 1e-5)
        assert results[0][wrap]["tokens"] == results[1][wrap]["tokens"]
        assert results[0][wrap]["terms"] == results[1][wrap]["terms"]
