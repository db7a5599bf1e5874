"""Which micro-batches form a window, which one is last, and who stands in.

Every rank runs the window's largest micro-batch count, agreed at the previous step (in one
process the "agreement" is the local count). A rank that has run out stands in with its
last micro-batch at weight zero, so that its collectives (DDP's all-reduce, FSDP2's gathers)
pair with the other ranks' and the update stays the big batch's.
"""

from __future__ import annotations

import collections
import itertools
import warnings
from typing import Any, Iterable


class Lookahead:
    """An iterator that can tell how many items follow (up to a limit) by fetching them early.

    >>> it = Lookahead(range(3)); it.count(5), it.pop(), it.count(5)
    (3, 0, 2)
    """

    def __init__(self, iterable: Iterable[Any]):
        self._it = iter(iterable)
        self._ahead: collections.deque = collections.deque()
        self._exhausted = False

    def count(self, limit: int) -> int:
        """Items available, fetching until ``limit`` are held or the source ends."""
        while len(self._ahead) < limit and not self._exhausted:
            try:
                self._ahead.append(next(self._it))
            except StopIteration:
                self._exhausted = True
        return min(len(self._ahead), limit)

    def peek(self, n: int) -> list[Any]:
        """The first ``n`` fetched items, left in place."""
        return list(itertools.islice(self._ahead, n))

    def pop(self) -> Any:
        """The next item (one that :meth:`count` has fetched)."""
        return self._ahead.popleft()


def agree(counts: list[float]) -> int:
    """The next window's micro-batch count on every rank: the largest any rank has.

    ``counts[r]`` is rank r's count; -1 marks a rank with no micro-batch to stand in with.

    >>> agree([4.0, 4.0])
    4
    """
    if len(counts) == 1:  # one process: its own count
        return max(int(counts[0]), 0)
    target = int(max(counts))
    missing = [r for r, c in enumerate(counts) if c < 0]
    if target > 0 and missing:
        raise RuntimeError(
            f"uneven data across ranks: ranks {missing} have no micro-batch at all while others "
            "have data; give every rank data (DistributedSampler pads so that each gets as many)"
        )
    short = [r for r, c in enumerate(counts) if c < target]
    if target > 0 and short and len(counts) > 1:
        warnings.warn(
            f"ranks {short} have fewer micro-batches than others in this window; they stand in "
            "with zero-weight micro-batches, so the update is still the big batch's",
            stacklevel=4,
        )
    return target


class Planner:
    """Hands out one window's micro-batches: real ones, then stand-ins up to the agreed count."""

    def __init__(self, batches: Lookahead, stand_in: Any = None):
        self.batches = batches
        self.target = 0  # micro-batches in the open window, the same on every rank
        self.stand_in = stand_in  # this rank's last micro-batch, for zero-weight stand-ins
        self.ahead = 0  # this rank's own micro-batches in the next window, counted ahead
        self.limit = 0  # ... and in the open window: more would take the next window's
        self.given = 0

    def open(self) -> None:
        """A window opens: it takes the micro-batches counted ahead for it, then stands in."""
        self.limit, self.given = self.ahead, 0

    def local_count(self, k: int) -> float:
        """Micro-batches (up to k) this rank has for a window; -1 if it has none and no
        earlier micro-batch to stand in with."""
        n = self.batches.count(k)
        self.ahead = n
        return float(n) if n or self.stand_in is not None else -1.0

    def held(self) -> list[Any]:
        """This rank's micro-batches counted by the last :meth:`local_count` (not yet handed out)."""
        return self.batches.peek(self.ahead)

    def next(self) -> tuple[Any, bool]:
        """The next micro-batch and whether it is a stand-in."""
        batches = self.batches
        if self.given < self.limit and (batches._ahead or batches.count(1)):
            self.given += 1
            self.stand_in = batches.pop()
            return self.stand_in, False
        return self.stand_in, True
