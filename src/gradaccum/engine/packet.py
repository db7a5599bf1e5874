"""The step's one collective and its one host read, by field name.

Every number a step needs from all ranks travels in one small float64 all-reduce: the
window rule's sums (items, loss sums, per-term counts: on the device on an accelerator,
never read before the step), then host numbers (micro-batches, whether a gradient exists,
each rank's micro-batches for the next window, and the accumulator rule's counts read
ahead). After the gradient norm and the stores' deferred checks are appended, the whole
vector is read back to the host once. Each part names its fields; nobody reads by offset.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

Layout = Sequence[tuple[str, int]]


def rank_vector(world: int, rank: int, value: float) -> list[float]:
    """``value`` at this rank's position: summed over ranks, it gives every rank's value.

    >>> rank_vector(3, 1, 4.0)
    [0.0, 4.0, 0.0]
    """
    return [float(value) if r == rank else 0.0 for r in range(world)]


def unpack(values: Sequence[float], layout: Layout) -> dict[str, list[float]]:
    """Split ``values`` into the named fields of ``layout``.

    >>> unpack([1.0, 2.0, 3.0], [("items", 1), ("counts", 2)])
    {'items': [1.0], 'counts': [2.0, 3.0]}
    """
    out, at = {}, 0
    for name, size in layout:
        out[name] = list(values[at:at + size])
        at += size
    if at != len(values):
        raise AssertionError(f"the step's collective holds {len(values)} numbers, its layout {at}")
    return out


def _to_device(values: list[float], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.float64)
    if device.type == "cuda":  # from pinned memory the copy does not wait for the device
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class Packet:
    """One window's numbers summed over ranks: ``packet[name]`` before the read (a slice of
    a device tensor on the device path: use it in arithmetic, do not read it), and
    :meth:`read` for the host values, once."""

    def __init__(self, device_layout: Layout, host_layout: Layout, local: Any, host: list[float], all_sum: Any,
                 world: int):
        self.device_layout, self.host_layout = list(device_layout), list(host_layout)
        self._host_kept: list[float] = []
        if isinstance(local, torch.Tensor):
            if world > 1:
                self.summed: Any = all_sum(torch.cat([local, _to_device(host, local.device)]))
            else:  # one process keeps its host numbers on the host: copying them over would wait
                self.summed, self._host_kept = local, host
        else:
            self.summed = all_sum(list(local) + host)
        self._at = {}
        at = 0
        for name, size in self.device_layout + (self.host_layout if not self._host_kept else []):
            self._at[name] = (at, at + size)
            at += size

    def __getitem__(self, name: str) -> Any:
        """A summed field before the read (device fields only on the device path)."""
        start, stop = self._at[name]
        return self.summed[start:stop]

    def read(self, norm: torch.Tensor, checks: list[torch.Tensor]) -> dict[str, list[float]]:
        """Every field, the norm (``"norm"``) and the checks (``"checks"``) on the host: the
        step's one host sync on an accelerator."""
        extra = [("norm", 1), ("checks", len(checks))]
        if isinstance(self.summed, torch.Tensor):
            parts = [self.summed, norm.detach().reshape(1).to(self.summed), *(c.reshape(1).to(self.summed) for c in checks)]
            values = torch.cat(parts).tolist()
        else:
            values = list(self.summed) + [float(norm)] + [float(c) for c in checks]
        if self._host_kept:
            device = len(values) - 1 - len(checks)
            values = values[:device] + self._host_kept + values[device:]
        return unpack(values, self.device_layout + self.host_layout + extra)
