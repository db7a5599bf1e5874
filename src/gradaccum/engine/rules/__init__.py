"""The normalisation rules: how a window's micro-batches are weighed and its denominator fixed.

One class per rule, chosen once (``build``), owning its micro-batch weight, its boundary
scale, its named fields in the step's one collective, its ``StepReport`` fields and its
part of the saved state (see :class:`Rule`). No other engine module asks which rule is in
use; they call the window's rule.

- :class:`Mean`: a mean over items (the default);
- :class:`Terms`: several terms, each a mean over its own items, counted ahead (``terms=``);
- :class:`StoredTerms`: several terms without counters, one gradient store per term;
- :class:`Coupled`: a window of cached representations (``window.encode``).

``docs/design.md`` walks through adding one.
"""

from .base import Rule
from .coupled import Coupled
from .mean import Mean
from .stored import StoredTerms
from .terms import Terms

__all__ = ["Coupled", "Mean", "Rule", "StoredTerms", "Terms"]
