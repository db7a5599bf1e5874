"""Bad input: a clear error that says what is accepted, and nothing changed."""

from __future__ import annotations

import pytest
import torch

import gradaccum


def setup(steps=2):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, opt, gradaccum.Accumulator(model, opt, steps=steps)


def batches(n=4):
    return [torch.randn(2, 3) for _ in range(n)]


@pytest.mark.parametrize("steps", [0, -1, 1.5, "4", None, True])
def test_bad_steps_fail_in_the_constructor(steps):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match="steps must be"):
        gradaccum.Accumulator(model, opt, steps=steps)


def test_callable_steps_returning_nonsense_fails_with_the_step_number():
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=lambda s: 0)
    with pytest.raises(ValueError, match="optimizer step 0"):
        next(iter(acc.windows(batches())))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"precision": "fp8"}, "precision must be one of"),
        ({"max_grad_norm": 0}, "max_grad_norm must be"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm must be"),
        ({"accum_dtype": torch.int32}, "accum_dtype must be"),
        ({"accum_dtype": "float32"}, "accum_dtype must be"),
    ],
)
def test_bad_options(kw, match):
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=match):
        gradaccum.Accumulator(model, opt, steps=2, **kw)


def test_non_scalar_loss_is_refused_before_any_gradient():
    model, _, acc = setup()
    for window in acc.windows(batches()):
        for x in window:
            with pytest.raises(ValueError, match="scalar"):
                window.backward(model(x), num_items=2)
            assert model.weight.grad is None
            break
        break


@pytest.mark.parametrize("n", [0, -3, float("nan"), torch.tensor(0), "5"])
def test_bad_num_items(n):
    model, _, acc = setup()
    for window in acc.windows(batches()):
        for x in window:
            with pytest.raises(ValueError, match="num_items"):
                window.backward(model(x).mean(), num_items=n)
            assert model.weight.grad is None
            break
        break


def test_mixing_weighted_and_unweighted_in_one_window():
    model, _, acc = setup()
    window = next(iter(acc.windows(batches())))
    it = iter(window)
    window.backward(model(next(it)).mean(), num_items=2)
    with pytest.raises(ValueError, match="for every micro-batch"):
        window.backward(model(next(it)).mean())


def test_step_twice_and_backward_after_step():
    model, _, acc = setup()
    window = next(iter(acc.windows(batches())))
    for x in window:
        window.backward(model(x).mean())
    window.step()
    with pytest.raises(RuntimeError, match="already called"):
        window.step()
    with pytest.raises(RuntimeError, match="after step"):
        window.backward(model(torch.randn(2, 3)).mean())


def test_step_without_backward_and_a_forgotten_step():
    model, _, acc = setup()
    gen = acc.windows(batches())
    window = next(gen)
    with pytest.raises(RuntimeError, match="no backward"):
        window.step()
    for x in window:
        window.backward(model(x).mean())
    with pytest.raises(RuntimeError, match="was not called before the next window"):
        next(gen)


def test_empty_loader_yields_no_window():
    _, _, acc = setup()
    assert list(acc.windows([])) == []


def test_loss_without_grad():
    model, _, acc = setup()
    window = next(iter(acc.windows(batches())))
    with pytest.raises(ValueError, match="does not require grad"):
        window.backward(torch.tensor(1.0))


def test_foreign_state_dict_is_refused():
    _, _, acc = setup()
    with pytest.raises(ValueError, match="not an Accumulator state_dict"):
        acc.load_state_dict({"weights": 1})


def test_a_meta_count_is_named():
    model, opt, acc = setup()
    for window in acc.windows(batches()):
        x = next(iter(window))
        with pytest.raises(ValueError, match="num_items is a meta tensor"):
            window.backward(model(x).pow(2).mean(), num_items=torch.tensor(2.0, device="meta"))
        break
    acc = gradaccum.Accumulator(model, opt, steps=2, terms={"a": len})
    for window in acc.windows(batches()):
        x = next(iter(window))
        with pytest.raises(ValueError, match="for term 'a' is a meta tensor"):
            window.backward({"a": (model(x).pow(2).mean(), torch.tensor(2.0, device="meta"))})
        break


def test_a_refused_window_is_not_applied_and_the_loop_goes_on():
    # A window whose terms' counts disagree with the counters is refused at its step; a caller
    # that catches it gets the rest of its data (9 micro-batches, windows of 3), not a silent end.
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=3, terms={"a": lambda b: len(b)})
    seen, refused, applied = 0, 0, 0
    for w, window in enumerate(acc.windows(batches(9))):
        for x in window:
            seen += 1
            n = len(x) + (1 if w == 0 else 0)  # window 0 gives counts its counter did not count
            window.backward({"a": (model(x).pow(2).mean(), n)})
        try:
            window.step()
            applied += 1
        except ValueError as exc:
            assert "not applied" in str(exc)
            refused += 1
    assert (seen, refused, applied) == (9, 1, 2)
    assert acc.state.optimizer_step == 2


def test_a_counter_failing_on_the_next_window_does_not_cost_this_one():
    # The counter raises on window 2's micro-batches, which are counted during window 1's step:
    # window 1 is applied, and the error comes when window 2 would open.
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = batches(4)
    bad = data[2]

    def counter(b):
        if b is bad:
            raise ValueError("this micro-batch cannot be counted")
        return len(b)

    acc = gradaccum.Accumulator(model, opt, steps=2, terms={"a": counter})
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="cannot be counted"):
        for window in acc.windows(data):
            for x in window:
                window.backward({"a": (model(x).pow(2).mean(), len(x))})
            window.step()
    assert acc.state.optimizer_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_one_process_draws_a_window_after_the_update_before_it():
    # On-policy data: micro-batches generated from the current weights. In one process (no
    # counters) a window's micro-batches are drawn after the previous window's update.
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=2)
    stamps = []

    def on_policy():
        for _ in range(6):
            stamps.append(acc.state.optimizer_step)  # the updates done when it is drawn
            yield torch.randn(2, 3)

    for window in acc.windows(on_policy()):
        for x in window:
            window.backward(model(x).pow(2).mean())
        window.step()
    assert stamps == [0, 0, 1, 1, 2, 2]
    # With counters the next window is counted during the step, before the update (documented).
    acc = gradaccum.Accumulator(model, opt, steps=2, terms={"a": len})
    stamps.clear()
    for window in acc.windows(on_policy()):
        for x in window:
            window.backward({"a": (model(x).pow(2).mean(), len(x))})
        window.step()
    assert stamps == [0, 0, 0, 0, 1, 1]
