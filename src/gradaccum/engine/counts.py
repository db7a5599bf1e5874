"""The mean rule's running counters of a window: items, loss sum, invalid counts.

Two implementations, chosen once. On the CPU the numbers are read as they come (there is
no device to wait for). On an accelerator they stay tensors on the device and are read
once, at the step, together with the gradient norm: one host sync per window. Nothing
here builds a device tensor from host numbers once per window: such a copy from pageable
memory waits for the device.
"""

from __future__ import annotations

from typing import Any, Union

import torch

from .. import _weights
from .._state import AccumulatorState

Number = Union[float, torch.Tensor]


class HostCounts:
    """Counters as Python numbers; ``num_items`` is validated as it arrives."""

    on_device = False

    def __init__(self, state: AccumulatorState):
        self.state = state

    def items(self, num_items: Any) -> tuple[Number, bool]:
        return _weights.micro_batch_items(num_items, self.state.weighted)

    def record(self, loss: torch.Tensor, n: Number) -> None:
        st = self.state
        st.items += n
        st.loss_sum += loss.item() * n

    def values(self) -> Any:
        """[items, loss sum, invalid counts] of the open window on this rank."""
        return [self.state.items, self.state.loss_sum, 0.0]

    def settle(self) -> tuple[float, float]:
        """Items and loss sum of the open window as host numbers, for a checkpoint."""
        return float(self.state.items), float(self.state.loss_sum)

    def reset(self) -> None:
        pass

    def load(self, items: float, loss_sum: float) -> None:
        """Start from a loaded window's counters (already in the state)."""


class DeviceCounts(HostCounts):
    """Counters as float64 tensors on ``device``; a tensor ``num_items`` is never read."""

    on_device = True

    def __init__(self, state: AccumulatorState, device: torch.device):
        super().__init__(state)
        self.device = device
        self.t = torch.zeros(3, dtype=torch.float64, device=device)

    def reset(self) -> None:
        """Zero for the next window: in place, on the device (no copy from the host)."""
        self.t.zero_()

    def load(self, items: float, loss_sum: float) -> None:
        # Once per load, not per window: a copy from the host is fine here.
        self.t = torch.tensor([float(items), float(loss_sum), 0.0], dtype=torch.float64, device=self.device)

    def items(self, num_items: Any) -> tuple[Number, bool]:
        if isinstance(num_items, torch.Tensor) and num_items.numel() == 1 and not num_items.is_meta:
            _weights.micro_batch_items(1, self.state.weighted)  # the mixing check, on the host
            n = num_items.detach().reshape(()).to(device=self.device, dtype=torch.float64)
            # Checked at the step, with everything else read there: a count must be > 0.
            self.t[2] += (n <= 0) | ~torch.isfinite(n)
            return n, True
        return super().items(num_items)

    def record(self, loss: torch.Tensor, n: Number) -> None:
        t = self.t
        t[0] += n
        t[1] += loss.detach().reshape(()).to(torch.float64) * n

    def values(self) -> torch.Tensor:
        return self.t.clone()

    def settle(self) -> tuple[float, float]:
        items, loss_sum, _ = self.t.tolist()  # one sync, for a checkpoint
        return items, loss_sum
