"""The RNG state a forward starts from, kept so that a second forward draws the same numbers
(dropout, router jitter): the re-encoding pass of cached representations, and a training
forward after its router's counting forward."""

from __future__ import annotations

import torch


def state(device: torch.device) -> tuple:
    """The CPU generator's state, and ``device``'s on CUDA.

    >>> torch.equal(state(torch.device("cpu"))[0], torch.get_rng_state())
    True
    """
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def restore(saved: tuple, device: torch.device) -> None:
    """Set the generators back to ``saved`` (from :func:`state`)."""
    cpu, cuda = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
