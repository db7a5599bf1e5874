"""Values quoted in error messages, cut to a readable length."""

from __future__ import annotations

from typing import Any


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: a message must stay readable whatever it quotes.

    >>> print(short("x" * 100, limit=12))
    'xxxxxxx...(102 chars)
    """
    text = repr(value) if len(str(type(value))) < 200 else object.__repr__(value)
    return text if len(text) <= limit else f"{text[:limit - 4]}...({len(text)} chars)"
