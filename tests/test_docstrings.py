"""The examples in the public docstrings run as written."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["gradaccum._weights", "gradaccum._text", "gradaccum._state", "gradaccum.engine.plan", "gradaccum.engine.parallel", "gradaccum.engine.grads", "gradaccum.engine.step", "gradaccum.engine.split", "gradaccum._lr", "gradaccum.nn",
           "gradaccum.recipes.config", "gradaccum.recipes.plan", "gradaccum.recipes.shard", "gradaccum.recipes.data", "gradaccum.transformers", "gradaccum.data", "gradaccum._items"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_every_public_name_has_a_docstring_with_an_example():
    import gradaccum

    for name in gradaccum.__all__:
        obj = getattr(gradaccum, name)
        doc = obj.__doc__ or ""
        assert doc.strip(), name
        assert ">>>" in doc or name in ("nn",), f"{name} has no example"


def test_transformers_public_names_have_examples():
    pytest.importorskip("transformers")
    import gradaccum.transformers as gt

    for name in gt.__all__:
        assert ">>>" in (getattr(gt, name).__doc__ or ""), name
