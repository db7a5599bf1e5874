"""Values quoted in error messages, cut to a readable length."""

from __future__ import annotations

import reprlib
from typing import Any

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short(value: Any, limit: int = 80) -> str:
    """A repr of ``value`` that stays short whatever it is: nested containers are cut while
    they are written (a YAML alias bomb never becomes a huge string), then to ``limit``.

    >>> print(short("x" * 100))
    'xxxxxxxxxxxxxxxxxxxxxxxxxxx...xxxxxxxxxxxxxxxxxxxxxxxxxxxx'
    >>> len(short([[list(range(9))] * 9] * 9)) <= 80
    True
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
