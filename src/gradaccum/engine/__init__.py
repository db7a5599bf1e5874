"""The accumulation engine: the only loop that turns micro-batches into optimizer steps.

``accumulator`` (the public loop, thin) over its parts, which ``build`` chooses once:
``plan`` (window membership, stand-ins), ``rules`` (the normalisation: a mean over items,
several terms counted ahead or held apart in ``termgrads``, cached representations;
``termvalues`` checks and reads what a user hands for terms),
``counts`` (the mean rule's counters), ``grads`` (where gradients are held), ``parallel``
and ``deepspeed`` (the data-parallel adapters), ``backward``, ``retry`` and ``split`` (one
micro-batch, its out-of-memory retry), ``encoded`` (cached representations) and ``rng`` (the
RNG a second forward replays), ``packet``
(the step's one collective, by name), ``step`` and ``checkpoint``; ``parts`` is what they
share. Loops that run their own backward (Accelerate, Lightning) share
``gradaccum._weights.Tally`` and ``termgrads`` instead.
"""

from .accumulator import Accumulator, Window
from .._state import AccumulatorState, StepReport

__all__ = ["Accumulator", "AccumulatorState", "StepReport", "Window"]
