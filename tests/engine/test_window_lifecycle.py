"""Engine v2: no silent steps, one pass per window, autocast only around the forward,
validated state, the user's own optimizer step, the device path's host syncs, compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from support.reference import RecordingSGD, TinyLM, big_batch_lm_grads, lm_mean_loss, make_sequences, rel_error


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def xy(n=8, size=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 4, generator=g), torch.randint(0, 2, (size,), generator=g)) for _ in range(n)]


def test_a_window_where_no_parameter_got_a_gradient_is_skipped_not_applied():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    acc = gradaccum.Accumulator(model, opt, steps=2, scheduler=sched)
    before = copy.deepcopy(model.state_dict())
    other = torch.ones(3, requires_grad=True)  # not an optimizer parameter
    for window in acc.windows(xy(2)):
        for x, y in window:
            window.backward((other * x.sum()).mean())
        report = window.step()
    assert report.skipped and report.grad_norm == 0.0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # weight decay did not run
    assert sched.last_epoch == 0 and not opt.state  # neither scheduler nor optimizer stepped


def test_iterating_a_window_twice_raises_and_takes_nothing_from_the_next():
    model = mlp()
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=2)
    data = xy(8)
    seen = []
    for window in acc.windows(data):
        for x, y in window:
            seen.append(x)
            window.backward(F.cross_entropy(model(x), y))
        with pytest.raises(RuntimeError, match="already iterated"):
            for _ in window:
                pass
        window.step()
    assert len(opt.seen) == 4 and len(seen) == 8  # every micro-batch trained, in windows of 2


def test_two_interleaved_window_loops_raise():
    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2)
    first = acc.windows(xy(4))
    window = next(first)
    with pytest.raises(RuntimeError, match="another acc.windows"):
        next(acc.windows(xy(4, seed=1)))
    for x, y in window:
        window.backward(F.cross_entropy(model(x), y))
    window.step()
    # Once the first loop is done (or abandoned), a new one may start.
    first.close()
    assert next(acc.windows(xy(2))).planned == 2


def test_backward_runs_without_autocast_forward_with_it():
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            seen["forward"] = torch.is_autocast_enabled("cpu")
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            seen["backward"] = torch.is_autocast_enabled("cpu")
            return g

    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, precision="bf16")
    for window in acc.windows(xy(2)):
        for batch in window:
            assert not torch.is_autocast_enabled("cpu")
            window.forward_backward(batch, lambda b: (
                F.cross_entropy(model(Probe.apply(b[0].requires_grad_())).float(), b[1]), len(b[1])))
            assert seen == {"forward": True, "backward": False}
            seen.clear()
        window.step()


def test_precision_without_window_autocast_warns_once():
    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, precision="bf16")
    with pytest.warns(UserWarning, match="window.autocast"):
        for window in acc.windows(xy(2)):
            for x, y in window:
                window.backward(F.cross_entropy(model(x), y))
            window.step()


def mid_window_state():
    torch.manual_seed(1)
    model = TinyLM()
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=3)
    window = next(acc.windows([make_sequences(3, seed=s) for s in range(3)]))
    for i, seqs in enumerate(window):
        loss, n = lm_mean_loss(model, seqs)
        window.backward(loss, num_items=n)
        if i == 1:
            break
    return model, opt, acc, acc.state_dict()


def _set(*path_and_value):
    *path, key, value = path_and_value

    def mutate(s):
        d = s
        for p in path:
            d = d[p]
        d[key] = value
        return s
    return mutate


@pytest.mark.parametrize(
    "mutate,error,match",
    [
        (lambda s: None, TypeError, "is a dict; got NoneType"),
        (_set("grads", -1, torch.zeros(3)), ValueError, "index -1 is outside"),
        (_set("grads", 0, torch.zeros(2, 2)), ValueError, "has shape"),
        (_set("grads", "w", torch.zeros(2)), TypeError, "parameter indices"),
        (_set("grads", 1, "x" * 10**6), TypeError, "must be a tensor"),
        (_set("state", "items", "many" * 10**5), TypeError, "'items' must be Real"),
        (_set("state", "micro_batches", 9), ValueError, "inconsistent"),
        (_set("state", "speed", 1), ValueError, "unknown fields"),
        (_set("extra", 1), ValueError, "unknown keys"),
    ],
)
def test_a_refused_state_names_what_is_wrong_and_changes_nothing(mutate, error, match):
    model, opt, acc, saved = mid_window_state()
    fresh = gradaccum.Accumulator(model, opt, steps=3)
    bad = mutate(copy.deepcopy(saved))
    before = fresh.state_dict()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(error, match=match) as info:
        fresh.load_state_dict(bad)
    assert len(str(info.value)) < 400  # a huge value is not quoted in full
    assert fresh.state_dict()["state"] == before["state"]
    assert all((a is None and p.grad is None) or torch.equal(a, p.grad) for a, p in zip(grads, model.parameters()))


def test_finish_then_your_own_optimizer_step_equals_step():
    mbs = [make_sequences(n, seed=10 + n) for n in (3, 1, 4, 2)]
    results = []
    for own in (False, True):
        torch.manual_seed(2)
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
        acc = gradaccum.Accumulator(model, opt, steps=2, scheduler=sched, max_grad_norm=0.1)
        ema = [p.detach().clone() for p in model.parameters()]
        for window in acc.windows(mbs):
            for seqs in window:
                loss, n = lm_mean_loss(model, seqs)
                window.backward(loss, num_items=n)
            if own:
                report = window.finish()
                norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
                assert float(norm) == pytest.approx(min(report.grad_norm, 0.1), rel=1e-4)  # clipped, ready
                if not report.skipped:
                    opt.step()
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters()):
                        e.lerp_(p, 0.1)
                window.close()
            else:
                window.step()
                with torch.no_grad():
                    for e, p in zip(ema, model.parameters()):
                        e.lerp_(p, 0.1)
        results.append((copy.deepcopy(model.state_dict()), ema, sched.last_epoch))
    (a, ea, sa), (b, eb, sb) = results
    assert sa == sb == 2
    assert all(torch.equal(a[k], b[k]) for k in a) and all(torch.equal(x, y) for x, y in zip(ea, eb))


def test_close_before_finish_and_twice_raise():
    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    window = next(acc.windows(xy(1)))
    for x, y in window:
        window.backward(F.cross_entropy(model(x), y))
    with pytest.raises(RuntimeError, match="before finish"):
        window.close()
    window.finish()
    window.close()
    with pytest.raises(RuntimeError, match="already called"):
        window.close()


def test_a_complete_window_saved_at_the_end_of_the_data_is_stepped_after_resume():
    # Saved after the last micro-batch of the final window, before its step: the resumed
    # loop has no data left, yet the window must be yielded and stepped.
    mbs = [make_sequences(n, seed=30 + n) for n in (2, 3, 1, 2)]
    torch.manual_seed(3)
    model = TinyLM()
    straight = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=2)
    for w, window in enumerate(acc.windows(mbs)):
        for seqs in window:
            loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n)
        if w == 1:
            break
        window.step()
    saved = copy.deepcopy(acc.state_dict())
    assert saved["state"]["micro_batches"] == saved["state"]["planned"] == 2
    acc2 = gradaccum.Accumulator(model, opt, steps=2)
    acc2.load_state_dict(saved)
    windows = 0
    for window in acc2.windows([]):
        for _ in window:
            raise AssertionError("no micro-batch is left")
        window.step()
        windows += 1
    assert windows == 1 and acc2.state.optimizer_step == 2
    opt_s = torch.optim.SGD(straight.parameters(), lr=0.1)
    acc_s = gradaccum.Accumulator(straight, opt_s, steps=2)
    for window in acc_s.windows(mbs):
        for seqs in window:
            loss, n = lm_mean_loss(straight, seqs)
            window.backward(loss, num_items=n)
        window.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), straight.parameters()))


class SyncCounter:
    """Counts the tensor reads that wait for the device: .item(), .tolist(), float(), bool(), int()."""

    NAMES = ["item", "tolist", "__float__", "__bool__", "__int__", "__index__"]

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            real = getattr(torch.Tensor, name)

            def wrapped(t, *a, _real=real, **kw):
                self.count += 1
                return _real(t, *a, **kw)

            monkeypatch.setattr(torch.Tensor, name, wrapped)


@pytest.mark.parametrize("compact", [False, True])
def test_device_path_no_host_sync_per_micro_batch_and_one_per_step(monkeypatch, compact):
    torch.manual_seed(4)
    model = TinyLM(vocab=400)
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=4, max_grad_norm=1.0, device_counts=True,
                                compact_embedding_grads=compact)
    mbs = [make_sequences(n, seed=40 + n) for n in (3, 1, 4, 2, 2, 3, 1, 2)]
    batches = []
    for seqs in mbs:
        ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s)) for s in seqs], batch_first=True)
        batches.append((ids, mask))

    def loss_and_count(ids, mask):
        logits = model(ids)[:, :-1]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        valid = mask[:, 1:].reshape(-1)
        count = valid.sum()
        return (ce * valid).sum() / count, count  # the count stays a tensor: never read by the user

    counter = SyncCounter(monkeypatch)
    per_micro_batch, per_step, refs = [], [], []
    for w, window in enumerate(acc.windows(batches)):
        for ids, mask in window:
            start = counter.count
            loss, count = loss_and_count(ids, mask)
            window.backward(loss, num_items=count)
            per_micro_batch.append(counter.count - start)
        monkeypatch.undo()
        refs.append(big_batch_lm_grads(model, mbs[4 * w:4 * w + 4]))
        counter = SyncCounter(monkeypatch)
        start = counter.count
        report = window.step()
        per_step.append(counter.count - start)
    monkeypatch.undo()
    assert per_micro_batch == [0] * 8 and per_step == [1, 1], (per_micro_batch, per_step)
    for got, want in zip(opt.seen, refs):
        norm = sum(float(g.pow(2).sum()) for g in want) ** 0.5
        want = [g * min(1.0, 1.0 / (norm + 1e-6)) for g in want]
        assert rel_error(got, want) < 1e-5
    assert report.num_items == sum(len(s) - 1 for mb in mbs[4:] for s in mb)


def test_device_path_checks_tensor_counts_at_the_step():
    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=2, device_counts=True)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="num_items must be > 0"):
        for window in acc.windows(xy(2)):
            for x, y in window:
                window.backward(F.cross_entropy(model(x), y), num_items=torch.tensor(0))
            window.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_compiled_model_trains_exactly_without_recompiling_per_window():
    dynamo = pytest.importorskip("torch._dynamo")
    torch.manual_seed(5)
    net = TinyLM()
    model = torch.compile(net, dynamic=True, backend="aot_eager")
    opt = RecordingSGD(net.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=3)
    # Item counts and shapes change in every window (batch sizes >= 2 and lengths >= 3:
    # sizes 0 and 1 are specialised by design).
    mbs = [make_sequences(n, seed=50 + i, lo=3, hi=20) for i, n in enumerate((3, 2, 4, 5, 2, 3, 4, 2, 6))]
    dynamo.reset()
    from torch._dynamo.utils import counters

    graphs, refs = [], []
    for w, window in enumerate(acc.windows(mbs)):
        for seqs in window:
            loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n)
        refs.append(big_batch_lm_grads(net, mbs[3 * w:3 * w + 3]))
        window.step()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    for got, want in zip(opt.seen, refs):
        assert rel_error(got, want) < 1e-5


def test_forward_backward_says_what_loss_fn_must_return():
    model = mlp()
    acc = gradaccum.Accumulator(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    for window in acc.windows(xy(1)):
        for batch in window:
            with pytest.raises(TypeError, match=r"loss_fn must return \(loss, num_items\).*Tensor of shape \(\)"):
                window.forward_backward(batch, lambda b: F.cross_entropy(model(b[0]), b[1]))
            assert all(p.grad is None for p in model.parameters())
            window.forward_backward(batch, lambda b: (F.cross_entropy(model(b[0]), b[1]), len(b[1])))
        assert not window.step().skipped


@pytest.mark.parametrize("terms", [False, True])
def test_no_counts_path_builds_a_tensor_from_host_numbers_per_window(monkeypatch, terms):
    # On an accelerator, torch.tensor([python numbers], device=...) copies from pageable host
    # memory and waits for the device: a second host sync per step. On the CPU that cannot be
    # timed, so every such call from the engine is counted instead, window after window.
    import sys

    made = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def wrapped(*a, _real=real, _name=name, **kw):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith("gradaccum"):
                made.append((_name, caller))
            return _real(*a, **kw)

        monkeypatch.setattr(torch, name, wrapped)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=2, device_counts=True, terms={"ce": len} if terms else None)
    per_window = []
    for window in acc.windows(xy(8)):
        start = len(made)
        for x, y in window:
            loss, n = F.cross_entropy(model(x), y), torch.tensor(float(len(y)))
            window.backward({"ce": (loss, n)} if terms else loss, num_items=None if terms else n)
        window.step()
        per_window.append(made[start:])
    monkeypatch.undo()
    assert all(not calls for calls in per_window[1:]), per_window
