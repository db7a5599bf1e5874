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
