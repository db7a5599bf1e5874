"""BatchNorm under accumulation.

A BatchNorm layer normalizes each micro-batch with that micro-batch's statistics, and
updates its running statistics once per micro-batch: neither is what the big batch does.
``convert_batchnorm`` swaps such layers for GroupNorm (no batch statistics at all) or for
:class:`WindowBatchNorm`, whose running statistics after a window equal those of one
big-batch forward. What stays different with ``"window"``: the normalization inside each
micro-batch still uses that micro-batch's mean and variance.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["WindowBatchNorm", "convert_batchnorm"]


class WindowBatchNorm(_BatchNorm):
    """BatchNorm whose running mean and variance are updated once per window, from the
    statistics of all the window's micro-batches combined exactly (float64 sums), with the
    momentum applied once. :class:`gradaccum.Accumulator` closes the window at each step.

    Example:
        >>> bn = WindowBatchNorm(8)
        >>> _ = bn(torch.randn(4, 8)); _ = bn(torch.randn(6, 8))
        >>> bn.close_window()  # as if one forward had seen all 10 samples
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self._sums: Optional[torch.Tensor] = None  # per channel: count, sum, sum of squares

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (N, C, ...); got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training or not self.track_running_stats:
            return super().forward(input)
        with torch.no_grad():
            dims = [0] + list(range(2, input.dim()))
            x = input.detach().double()
            count = torch.full((self.num_features,), x.numel() / self.num_features, dtype=torch.float64, device=x.device)
            stats = torch.stack([count, x.sum(dims), (x * x).sum(dims)])
            self._sums = stats if self._sums is None else self._sums + stats
        # Normalize with this micro-batch's statistics; running buffers untouched here.
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @torch.no_grad()
    def close_window(self) -> None:
        """Fold the window's combined statistics into the running ones, once."""
        if self._sums is None:
            return
        count, total, squares = self._sums
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0) * count / (count - 1).clamp_min(1)
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        assert tracked is not None and running_mean is not None and running_var is not None  # tracking stats
        tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(tracked)
        running_mean.mul_(1 - m).add_(mean.to(running_mean.dtype), alpha=m)
        running_var.mul_(1 - m).add_(var.to(running_var.dtype), alpha=m)
        self._sums = None


def _groups(channels: int, most: int = 32) -> int:
    # Wu & He (2018) use 32 groups; keep at least 2 channels per group so that a group
    # still has statistics across channels.
    for g in range(min(most, max(1, channels // 2)), 0, -1):
        if channels % g == 0:
            return g
    return 1


def convert_batchnorm(model: torch.nn.Module, to: str = "groupnorm") -> torch.nn.Module:
    """Replace every BatchNorm layer of ``model`` in place and return it.

    Args:
        to: ``"groupnorm"`` (GroupNorm with up to 32 groups, affine weights copied) or
            ``"window"`` (:class:`WindowBatchNorm`, weights and running statistics copied).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.BatchNorm2d(8))
        >>> type(convert_batchnorm(net, to="groupnorm")[1]).__name__
        'GroupNorm'
    """
    if to not in ("groupnorm", "window"):
        raise ValueError(f"to must be 'groupnorm' or 'window'; got {to!r}")
    for name, child in list(model.named_children()):
        if isinstance(child, _BatchNorm) and not isinstance(child, WindowBatchNorm):
            c = child.num_features
            new: torch.nn.Module
            if to == "groupnorm":
                new = torch.nn.GroupNorm(_groups(c), c, eps=child.eps, affine=child.affine)
            else:
                new = WindowBatchNorm(c, child.eps, child.momentum, child.affine, child.track_running_stats)
                if child.track_running_stats:
                    new.load_state_dict(child.state_dict())
            if child.affine and to == "groupnorm":
                with torch.no_grad():
                    new.weight.copy_(child.weight)
                    new.bias.copy_(child.bias)
            ref = child.weight if child.affine else child.running_mean
            if ref is not None:
                new.to(device=ref.device, dtype=ref.dtype)
            new.train(child.training)
            setattr(model, name, new)
        else:
            convert_batchnorm(child, to)
    return model
