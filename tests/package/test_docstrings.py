"""The examples in the public docstrings run as written."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import gradaccum

# Every module of the package, found rather than listed, so a new module's examples run too.
# MindSpore's run in its own environment (tests_mindspore), where torch is not installed.
MODULES = sorted(m.name for m in pkgutil.walk_packages(gradaccum.__path__, "gradaccum.")
                 if not m.name.startswith("gradaccum.mindspore") and m.name != "gradaccum.__main__")


def test_every_module_is_found():
    assert {"gradaccum._weights", "gradaccum.engine.rules.mean", "gradaccum.recipes.run"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # an optional extra that this environment does not have
        pytest.skip(f"{name}: {exc}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
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
