"""Losses with several denominators (``Accumulator(terms=...)``), beyond the composition matrix.

The matrix (``test_matrix.py``, features ``terms*``) covers one process, DDP, FSDP2 and
DeepSpeed ZeRO-2 in every precision with stand-ins, partial windows, OOM retries, clipping
and a mid-window resume. Here: windows of changing size (callable ``steps``, a token budget,
one process and 2 ranks), the ways of giving counts, the reports, and bad input.
"""

from __future__ import annotations

import copy

import pytest
import torch

from support import dist_workers
import gradaccum
from support import matrix_cells as mc
from support import terms_cells as tc
from support.reference import RecordingSGD, rel_error


def _data(other: bool = False) -> list[dict]:
    """The matrix cells' six micro-batches (``other``: the second rank's six)."""
    return mc.rank_data("counts", 1, 2) if other else mc.rank_data("counts", 0, 1)


def _check(net, seen, window_batches, tol=1e-5):
    assert len(seen) == len(window_batches)
    for w, (got, batches) in enumerate(zip(seen, window_batches)):
        want, _ = tc.reference(net, batches)
        assert rel_error(got, want) < tol, f"window {w}: {rel_error(got, want):.3g}"


def test_callable_steps_partial_last_window_and_the_reports():
    net, data = tc.model(), _data() + _data(other=True)  # 12 micro-batches: windows of 2, 4, 4, 2 (partial)
    steps = lambda s: 2 if s == 0 else 4  # noqa: E731
    seen, reports = tc.train(copy.deepcopy(net), data, steps)
    windows = [data[0:2], data[2:6], data[6:10], data[10:12]]
    _check(net, seen, windows)
    for report, batches in zip(reports, windows):
        _, terms = tc.reference(net, batches)
        assert report.terms == pytest.approx(terms, rel=1e-5)
        assert report.loss == pytest.approx(sum(terms.values()), rel=1e-5) and report.num_items is None


def test_token_budget_windows_in_one_process():
    sampler, windows, seqs = tc.token_budget_batches(0, 1)
    assert len({len(w) for w in windows}) > 1  # the budget cut windows of different sizes
    net = tc.model()
    loader = torch.utils.data.DataLoader(seqs, batch_sampler=sampler, collate_fn=mc.batch_of)
    seen, _ = tc.train(copy.deepcopy(net), loader, sampler)
    _check(net, seen, windows)


@pytest.mark.multiprocess
def test_token_budget_windows_on_two_ddp_ranks_with_stand_ins(tmp_path):
    results = dist_workers.spawn(tc.token_budget_two_ranks, 2, tmp_path)
    for r in results:
        assert "error" not in r, r.get("trace")
    assert any(results[0]["stand_ins"]) or any(results[1]["stand_ins"])  # ranks' windows differed
    per_rank = [tc.token_budget_batches(r, 2)[1] for r in range(2)]
    windows = [per_rank[0][w] + per_rank[1][w] for w in range(len(per_rank[0]))]
    net = tc.model()
    _check(net, results[0]["seen"], windows)
    for a, b in zip(results[0]["seen"], results[1]["seen"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert results[0]["terms"] == results[1]["terms"]


def test_the_ways_of_giving_counts_agree():
    net, data = tc.model(), _data()

    def bare(window, b):  # means alone: each term's count comes from its counter
        window.backward({k: v[0] for k, v in mc.term_losses(window_net[0], b).items()})

    def via_forward_backward(window, b):
        window.forward_backward(b, lambda x: mc.term_losses(window_net[0], x))

    runs = []
    for loss, kw in [(None, {}), (bare, {}), (via_forward_backward, {}), (None, {"device_counts": True})]:
        m = copy.deepcopy(net)
        window_net = [m]
        loss = loss or (lambda window, b, m=m: window.backward(mc.term_losses(m, b)))
        runs.append(tc.train(m, data, 3, loss=loss, **kw)[0])
    _check(net, runs[0], [data[0:3], data[3:6]])
    for other in runs[1:]:
        assert rel_error(other[0], runs[0][0]) < 1e-6 and rel_error(other[1], runs[0][1]) < 1e-6


def test_one_term_mapping_is_the_plain_call():
    net, data = tc.model(), _data()
    plain, mapped = copy.deepcopy(net), copy.deepcopy(net)
    a = tc.train(plain, data, 3, terms=None, loss=lambda w, b: w.backward(*mc.mean_loss(plain, b)))[0]
    b = tc.train(mapped, data, 3, terms=None, loss=lambda w, b: w.backward({"lm": mc.mean_loss(mapped, b)}))[0]
    assert all(torch.equal(x, y) for s, t in zip(a, b) for x, y in zip(s, t))


def test_a_single_weight_per_micro_batch_is_off():
    # What this replaces: the summed loss weighed by tokens (one denominator). Must be far off,
    # or the exactness checks above could not tell the difference.
    net, data = tc.model(), _data()
    m = copy.deepcopy(net)

    def summed(window, b):
        terms = mc.term_losses(m, b)
        loss = sum(v[0] for v in terms.values())
        window.backward(loss, num_items=int(terms["lm"][1]))

    seen = tc.train(m, data, 3, terms=None, loss=summed)[0]
    want, _ = tc.reference(net, data[0:3])
    assert rel_error(seen[0], want) > 0.02


@pytest.mark.parametrize("how", ["backward", "forward_backward_oom", "named"])
def test_several_terms_without_counters_keep_a_store_per_term(how):
    # terms=None: no term is counted ahead; "seq" first appears after the first micro-batch and
    # is absent from some; windows of 2, 4, 4 and a partial 2; an OOM splits micro-batches.
    net, data = tc.model(), _data(other=True) + _data()
    steps = lambda s: 2 if s == 0 else 4  # noqa: E731
    m = copy.deepcopy(net)
    if how == "backward":
        loss = lambda w, b: w.backward(mc.term_losses(m, b))  # noqa: E731
    else:
        m.oom.limit, m.oom.where = 2, "backward"
        loss = lambda w, b: w.forward_backward(b, lambda x: mc.term_losses(m, x))  # noqa: E731
    assert "seq" not in mc.term_losses(net, data[0]) and "seq" not in mc.term_losses(net, data[2])
    seen, reports = tc.train(m, data, steps, loss=loss, terms=["lm", "seq"] if how == "named" else None)
    windows = [data[0:2], data[2:6], data[6:10], data[10:12]]
    _check(net, seen, windows)
    for report, batches in zip(reports, windows):
        assert report.terms == pytest.approx(tc.reference(net, batches)[1], rel=1e-5)
    if how != "backward":
        assert sum(r.splits for r in reports) > 0


@pytest.mark.multiprocess
def test_several_terms_without_counters_on_two_ddp_ranks(tmp_path):
    both = dist_workers.spawn(tc.stored_two_ranks_both, 2, tmp_path)
    for oom in ("", "backward"):
        _stored_two_ranks_check([r[oom] if "error" not in r else r for r in both], oom)


def _stored_two_ranks_check(results, oom):
    for r in results:
        assert "error" not in r, r.get("trace")
    data = [_data(), _data(other=True)]
    net = tc.model()
    _check(net, results[0]["seen"], [data[0][0:3] + data[1][0:3], data[0][3:6] + data[1][3:6]])
    for a, b in zip(results[0]["seen"], results[1]["seen"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert results[0]["terms"] == results[1]["terms"]
    assert bool(oom) == (sum(results[0]["splits"]) + sum(results[1]["splits"]) > 0)
    # Without terms= a rank cannot know which terms the others will bring: named the way out.
    assert all("terms=['lm', 'seq']" in r["refused"] for r in results), results[0]["refused"]


def test_one_term_mappings_of_two_terms_in_a_window_are_two_denominators():
    # {"lm": ...} then {"seq": ...}: one weight each would mix two means; the engine keeps a store.
    net, data = tc.model(), _data()[:2]
    m = copy.deepcopy(net)
    names = iter(["lm", "seq"])
    seen = tc.train(m, data, 2, terms=None, loss=lambda w, b: w.backward(
        (lambda n, t: {n: t[n]})(next(names), mc.term_losses(m, b))))[0]
    mm = copy.deepcopy(net).double()
    lm = mc.mean_loss_terms(mm, data[0])
    seq = mc.SEQ_COEF * mc.sequence_means(mm, data[1]).mean()
    (lm[0] / lm[1] + seq).backward()
    assert rel_error(seen[0], [p.grad for p in mm.parameters()]) < 1e-5


def test_several_terms_without_counters_are_refused_where_they_cannot_be_held_apart():
    net = tc.model()
    acc = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=2)
    for window in acc.windows(_data()):
        it = iter(window)
        window.backward(*mc.mean_loss(net, next(it)))
        with pytest.raises(ValueError, match="the same form"):
            window.backward(mc.term_losses(net, next(it)))
        break
    acc = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=2)
    for window in acc.windows(_data()):
        window.backward(mc.term_losses(net, next(iter(window))))
        with pytest.raises(RuntimeError, match="Save at a window boundary"):
            acc.state_dict()
        break


@pytest.mark.parametrize("bad, message", [
    (lambda t: {**t, "other": t["lm"]}, "does not count"),
    (lambda t: {"lm": (t["lm"][0].detach(), 3)}, "requires grad"),
    (lambda t: {"lm": (t["lm"][0], -1)}, "finite number >= 0"),
    (lambda t: {}, "no term"),
    (lambda t: t["lm"][0], r"give the mapping"),  # a plain loss would be weighed by the terms' scale
])
def test_bad_terms_are_refused(bad, message):
    net = tc.model()
    acc = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=2, terms=mc.COUNTERS)
    window = next(iter(acc.windows(_data())))
    batch = next(iter(window))
    with pytest.raises(ValueError, match=message):
        window.backward(bad(mc.term_losses(net, batch)))


def test_a_counter_that_disagrees_with_the_counts_given_fails_the_window_and_changes_nothing():
    net = tc.model()
    before = [p.detach().clone() for p in net.parameters()]
    counters = {**mc.COUNTERS, "lm": lambda b: int(b["mask"].sum())}  # counts the first token too
    acc = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=3, terms=counters)
    with pytest.raises(ValueError, match=r"term 'lm'.*counter counted"):
        for window in acc.windows(_data()):
            for batch in window:
                window.backward(mc.term_losses(net, batch))
            window.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_constructor_refuses_bad_counters():
    net = tc.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="non-empty mapping"):
        gradaccum.Accumulator(net, opt, terms={})
    with pytest.raises(TypeError, match="not"):
        gradaccum.Accumulator(net, opt, terms={"lm": 3})


def test_mid_window_state_is_refused_by_an_accumulator_built_otherwise():
    net, data = tc.model(), _data()
    acc = gradaccum.Accumulator(net, RecordingSGD(net.parameters(), lr=0.0), steps=3, terms=mc.COUNTERS)
    for window in acc.windows(data):
        for batch in window:
            window.backward(mc.term_losses(net, batch))
            break
        break
    saved = acc.state_dict()
    assert sorted(saved["state"]["terms"]) == ["lm", "seq"]
    plain = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=3)
    with pytest.raises(ValueError, match="build it as the checkpointed one was"):
        plain.load_state_dict(saved)
    other = gradaccum.Accumulator(net, torch.optim.SGD(net.parameters(), lr=0.1), steps=3,
                                  terms={"lm": mc.COUNTERS["lm"], "kl": len})
    with pytest.raises(ValueError, match="checkpointed run's terms"):
        other.load_state_dict(saved)
    broken = copy.deepcopy(saved)
    broken["state"]["terms"]["lm"] = [1.0, "x", 0.0]
    with pytest.raises(ValueError, match="'terms' must map"):
        acc.load_state_dict(broken)


@pytest.mark.multiprocess
def test_the_docs_example_runs_as_written(tmp_path):
    # docs/terms.md's script, as a user copies it: the real MiniLM on the drug reviews.
    import pathlib
    import re
    import subprocess
    import sys

    pytest.importorskip("transformers")
    doc = (pathlib.Path(__file__).parents[2] / "docs" / "terms.md").read_text()
    script = tmp_path / "terms_example.py"
    script.write_text(re.search(r"```python\n(.*?)```", doc, re.S).group(1))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 2 and "'sentiment'" in steps[0] and "'mlm'" in steps[0], proc.stdout
