"""Hugging Face Transformers: count items like the model's loss does; exact ``Trainer`` accumulation.

Why a ``Trainer`` subclass and not a callback: callbacks see events (step begin, step end)
but never the loss, and the fix has to change what each micro-batch's loss is multiplied by
before its backward. ``Trainer`` divides every micro-batch loss by k unless it believes the
model already divided by the window's item count, and it believes so for any model whose
``forward`` takes ``**kwargs`` - which a ``BertForSequenceClassification`` does while its
loss ignores the count, so its gradient comes out k times too large. The mixin below takes
the decision away from that guess: the model returns its own mean over its micro-batch, and
the mixin weighs it by the micro-batch's share of the window's items, counted by
:func:`count_items` over every micro-batch of the window (and every rank) before the first
backward. Everything else (clipping, the optimizer, the scheduler, logging, checkpoints)
stays the ``Trainer``'s own.

Example:
    >>> from gradaccum.transformers import Trainer  # doctest: +SKIP
    >>> args = TrainingArguments("out", per_device_train_batch_size=4, gradient_accumulation_steps=3)  # doctest: +SKIP
    >>> Trainer(model=model, args=args, train_dataset=train, data_collator=collator).train()  # doctest: +SKIP
"""

from .._items import count_items
from ._mixin import ExactAccumulationMixin, Trainer, item_kind

__all__ = ["ExactAccumulationMixin", "Trainer", "count_items", "item_kind"]
