"""The exact ``Trainer``: the mixin, the subclass, and reading what a model's loss averages over."""

from __future__ import annotations

import contextlib
import typing
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Union

import torch
import torch.distributed as dist
import transformers

from . import _router, _trl
from .._items import KINDS, count_items
from .._weights import share
from ..engine.rules.base import first_mean
from ..engine.termvalues import check_counters, pair
from ..engine.termvalues import count as count_term


ItemsLike = Union[str, Callable[[Mapping[str, Any]], int], None]

# Heads whose loss is a mean over samples, and heads whose loss is a mean over labelled tokens.
_SAMPLE_HEADS = ("ForSequenceClassification", "ForMultipleChoice", "ForQuestionAnswering",
                 "ForImageClassification", "ForAudioClassification", "ForVideoClassification")
_TOKEN_HEADS = ("ForMaskedLM", "ForTokenClassification", "ForConditionalGeneration", "ForCTC")
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


def item_kind(model: torch.nn.Module) -> str:
    """How ``model``'s loss averages: ``"samples"``, ``"tokens"`` or ``"causal-lm"``.

    ``"causal-lm"`` counts labels after the shift by one that the causal loss applies.
    Raises ``ValueError`` for a model whose head says nothing about it.

    Example:
        >>> item_kind(transformers.BertForSequenceClassification(config))  # doctest: +SKIP
        'samples'
    """
    while isinstance(getattr(model, "module", None), torch.nn.Module):  # DDP and similar wrappers
        model = model.module  # type: ignore[assignment]
    name = type(model).__name__
    loss_type = getattr(model, "loss_type", None) or ""
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return "tokens"  # decoder labels are aligned with the (right-shifted) decoder inputs
    causal_names = set(getattr(transformers.models.auto.modeling_auto, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", {}).values())
    if loss_type == "ForCausalLM" or name in causal_names or name.endswith(_CAUSAL_HEADS):
        return "causal-lm"
    if loss_type in _SAMPLE_HEADS or name.endswith(_SAMPLE_HEADS):
        return "samples"
    if loss_type in _TOKEN_HEADS or name.endswith(_TOKEN_HEADS):
        return "tokens"
    raise ValueError(
        f"cannot tell what {name}'s loss averages over: pass items='samples', 'tokens' or "
        "'causal-lm', or a function batch -> number of items"
    )


if TYPE_CHECKING:  # type checkers see the Trainer the mixin goes in front of
    _TrainerBase = transformers.Trainer
else:
    _TrainerBase = object


class ExactAccumulationMixin(_TrainerBase):
    """Makes a ``transformers.Trainer`` (or a subclass of it) accumulate exactly.

    Mix in before the trainer class: ``class MyTrainer(ExactAccumulationMixin, SFTTrainer)``.
    The extra keyword ``items`` says how to count a micro-batch's items: ``"samples"``,
    ``"tokens"``, ``"causal-lm"`` or a function ``batch -> int``; by default it is read
    off the model (:func:`item_kind`) when training starts. A model whose head says nothing
    (a custom ``PreTrainedModel``, a plain ``nn.Module``) is weighed by samples, with one
    warning: exact when its loss is a mean over samples. With
    ``gradient_accumulation_steps=1`` in one process nothing is counted and every step is
    the stock ``Trainer``'s.

    Each window of ``gradient_accumulation_steps`` micro-batches then updates with the
    gradient of the mean over all its items (and all ranks): the update of one batch of
    ``per_device_train_batch_size * gradient_accumulation_steps * world_size``.

    Example:
        >>> class ExactSFT(ExactAccumulationMixin, SFTTrainer):  # doctest: +SKIP
        ...     pass
    """

    # Our loss already carries the window's weights: Trainer must not divide it by k.
    loss_is_scaled_for_ga = True

    def __init__(self, *args: Any, items: ItemsLike = None, terms: Optional[Mapping[str, Callable[[Any], Any]]] = None,
                 **kwargs: Any) -> None:
        if not hasattr(transformers.Trainer, "loss_is_scaled_for_ga"):
            # Older Trainers divide the loss by k behind our back; we would rather refuse than be wrong.
            raise ImportError(
                f"gradaccum.transformers needs a transformers whose Trainer has loss_is_scaled_for_ga "
                f"(5.19 or newer; tested with 5.24); this one is {transformers.__version__}: pip install -U transformers"
            )
        if not (items is None or callable(items) or items in KINDS):
            raise ValueError(f"items must be one of {KINDS}, a function batch -> int, or None; got {items!r}")
        counters = check_counters(terms)
        if counters is not None and not isinstance(counters, dict):
            raise TypeError("terms= of the Trainer mixin maps each term to its counter, a function batch -> items that "
                            "term averages over: the window's batches are counted before its first backward")
        super().__init__(*args, **kwargs)
        self._terms: Optional[dict[str, Callable[[Any], Any]]] = counters
        self._term_counts: dict[int, list[float]] = {}  # per micro-batch of the window: each term's items
        self._term_totals: list[float] = []  # each term's items in the window, all ranks
        self._weighed = False  # whether compute_loss weighed the micro-batch's loss
        self._routing: Optional[_router.WindowRouting] = None  # an MoE model's router loss (see _router.py)
        self._routing_known = False
        self._items = items
        self._count: Optional[Callable[[Mapping[str, Any]], int]] = None  # known once training starts
        self._weights: Optional[dict[int, float]] = None
        self._weight: Optional[float] = None
        self._window_items, self._world = 0.0, 1
        self._divides: Optional[bool] = None  # whether compute_loss_func divides by num_items_in_batch
        # TRL's GRPOTrainer: its batches are prompts, counted after generation (see gradaccum._trl).
        self._grpo = _trl.is_trl(self, "GRPOTrainer")
        self._grpo_window: Optional[int] = None  # micro-batches of a window whose first is not yet prepared
        self._grpo_totals: Optional[torch.Tensor] = None
        if self._grpo and items is not None:
            raise ValueError(
                "items= with GRPOTrainer: its micro-batches are counted after generation, by the loss type's own "
                "items (completion tokens or completions); leave items out")

    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: torch.device) -> tuple[list, Any]:
        if self._grpo:
            batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
            if self._grpo_totals is None:
                _trl.check(self)
            self._grpo_window = len(batches)  # counted once its completions exist (_prepare_inputs)
            return batches, count
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if self.args.gradient_accumulation_steps == 1 and world == 1:
            # Nothing to accumulate and nobody to count with: exactly the stock Trainer.
            self._weights = None
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.n_gpu > 1:
            raise RuntimeError(
                "exact accumulation needs one process per device: torch.nn.DataParallel splits each "
                "micro-batch across GPUs behind the Trainer's back. Launch with torchrun instead."
            )
        if self._count is None:
            self._count = self._counter()
        counts = [self._count(b) for b in batches]
        names = list(self._terms or {})
        per_term = [[count_term(self._terms[t](b), t, "the counter's value") for t in names] for b in batches] if self._terms else []
        totals = [float(sum(counts))] + [float(sum(c[j] for c in per_term)) for j in range(len(names))]
        if world > 1:
            # Every rank must divide by the items of the whole step, not its own share.
            t = torch.tensor(totals, dtype=torch.float64, device=self.args.device)
            dist.all_reduce(t)
            totals = t.tolist()
        total = totals[0]
        if total <= 0 and not self._terms:
            raise ValueError("a window with no items to learn from: every label of its micro-batches is -100")
        # Micro-batch i weighs n_i / N, times the world size because DDP averages over ranks.
        self._weights = {id(b): share(n, total, world) if total > 0 else 0.0 for b, n in zip(batches, counts)}
        self._term_counts = {id(b): c for b, c in zip(batches, per_term)}
        self._term_totals = totals[1:]
        self._window_items, self._world = total, world
        if not self._routing_known:
            found = _router.spec(self)
            self._routing, self._routing_known = (_router.WindowRouting(*found) if found else None), True
        if self._routing is not None:  # the window's routing, counted before its first backward
            self._routing.count(self, batches, world)
        # None: nothing downstream may normalise by a window total the model may ignore.
        return batches, None

    def _prepare_inputs(self, inputs: Any) -> Any:
        prepared = super()._prepare_inputs(inputs)
        if self._grpo and self._grpo_window is not None and getattr(self.model, "training", False):
            # The window's first micro-batch: its generation has run, the window's completions exist.
            self._grpo_totals = _trl.window_totals(self, self._grpo_window)
            self._grpo_window = None
        return prepared

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if self._grpo:
            return super().training_step(model, inputs, num_items_in_batch)
        if self._weights is None:  # one micro-batch per step in one process: the stock step
            return super().training_step(model, inputs, num_items_in_batch)
        weight = self._weights.get(id(inputs))
        if weight is None:
            raise RuntimeError(
                "training_step got a batch that get_batch_samples did not count: exact accumulation "
                "needs the Trainer's own training loop (trainer.train())"
            )
        self._weight = weight
        own = self.compute_loss

        def compute_loss(*args: Any, **kwargs: Any) -> Any:
            # The most derived compute_loss: a subclass's may return a mapping of terms, or a
            # mean that the mixin's own compute_loss (which it overrides) never weighed.
            self._weighed = False
            result = own(*args, **kwargs)
            loss, outputs = result if kwargs.get("return_outputs") else (result, None)
            if isinstance(loss, Mapping):
                loss = self._combine_terms(loss, inputs)
            elif not self._weighed:
                loss = loss * typing.cast(float, self._weight)
            return (loss, outputs) if kwargs.get("return_outputs") else loss

        self.compute_loss = compute_loss  # type: ignore[method-assign]
        replay = self._routing.replay(inputs, self.args.device) if self._routing is not None else contextlib.nullcontext()
        try:
            with replay:  # an MoE model routes as in its counting forward
                return super().training_step(model, inputs, None)
        finally:
            del self.compute_loss
            self._weight = None

    def _combine_terms(self, mapping: Mapping[str, Any], inputs: Any) -> torch.Tensor:
        """``sum_t mean_t * n_t * world / N_t``: each term at its exact share of the window."""
        if not self._terms:
            raise ValueError(
                f"compute_loss returned terms {list(mapping)}, but the trainer has no counters for them: the "
                "window's items of each term must be known before its first backward. Build it with "
                "terms={name: counter}, a function batch -> items that term averages over (see docs/terms.md)")
        names = list(self._terms)
        unknown = [k for k in mapping if k not in self._terms]
        if unknown:
            raise ValueError(f"compute_loss returned terms {unknown} that the trainer does not count; its terms are {names}")
        counted = self._term_counts.get(id(inputs))
        parts = []
        for j, name in enumerate(names):
            if name not in mapping:
                continue
            mean, n = pair(mapping[name], name)
            n = count_term(n, name, "num_items") if n is not None else (counted[j] if counted else 0.0)
            total = self._term_totals[j]
            if n and total > 0:
                parts.append(mean.reshape(()) * share(n, total, self._world))
        if not parts:  # no term has items here: a zero-weight backward keeps the graph's collectives
            return first_mean(mapping).reshape(()) * 0.0
        return sum(parts[1:], parts[0])

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        if self._grpo and model.training and self._grpo_totals is not None:
            totals = self._grpo_totals
            return _trl.exact_loss(self, inputs, totals, lambda: super(ExactAccumulationMixin, self).compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch))
        if self._weight is None:  # evaluation, prediction, or the stock step
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        self._weighed = True
        if self._routing is not None:  # the model's mean at its share, its router loss at the window's
            with self._routing.capture(typing.cast(torch.nn.Module, self.model)):
                result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
            mean, routed = result if return_outputs else (result, None)
            exact = self._routing.exact(typing.cast(torch.Tensor, mean), inputs, typing.cast(float, self._weight), self._world)
            return (exact, routed) if return_outputs else exact
        user_loss = self.compute_loss_func
        divides: list[bool] = []
        if user_loss is not None:
            total = self._window_items

            def with_window_count(outputs: Any, labels: Any, num_items_in_batch: Any = None) -> torch.Tensor:
                # Documented use: loss.sum() / num_items_in_batch, the window's count over all ranks.
                loss = user_loss(outputs, labels, num_items_in_batch=total)
                if self._divides is None:  # asked once: does the function divide by the count?
                    again = user_loss(outputs, labels, num_items_in_batch=2 * total)
                    self._divides = bool(torch.isclose(loss.detach().double(), 2 * again.detach().double(), rtol=1e-4))
                divides.append(self._divides)
                return loss

            self.compute_loss_func = with_window_count
        try:
            result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        finally:
            self.compute_loss_func = user_loss
        loss: Any
        loss, outputs = result if return_outputs else (result, None)
        if isinstance(loss, Mapping):  # terms: training_step weighs each at its own share
            self._weighed = False
            return result
        if divides and divides[0]:
            loss = loss * self._world  # already its share of the window's mean; DDP averages over ranks
        else:
            loss = loss * typing.cast(float, self._weight)  # a mean over this micro-batch: weigh it by its share
        return (loss, outputs) if return_outputs else loss

    @property
    def tokens_per_expert(self) -> Optional[list[float]]:
        """An MoE model's top-k assignments per expert in the last window, all layers and ranks
        (None before one closes, or for a model without a router loss): for balancing by expert
        bias instead of a loss.

        Example:
            >>> trainer.tokens_per_expert  # doctest: +SKIP
            [412.0, 388.0, 401.0, 399.0]
        """
        return self._routing.tokens_per_expert if self._routing is not None else None

    def _counter(self) -> Callable[[Mapping[str, Any]], int]:
        if callable(self._items):
            return self._items
        if self._items is None and _trl.is_trl(self, "DPOTrainer"):
            return _trl.dpo_pairs(self)  # DPO's losses average over preference pairs
        kind = self._items
        if kind is None:
            try:
                kind = item_kind(typing.cast(torch.nn.Module, self.model))
            except ValueError:
                # A custom model: its loss is most often a mean over the batch's samples.
                warnings.warn(
                    f"cannot tell what {type(self.model).__name__}'s loss averages over, so each micro-batch "
                    "is weighed by its samples (dim 0 of the labels, else of the inputs): exact when the loss "
                    "is a mean over samples. Pass items='tokens', 'causal-lm' or a function batch -> int "
                    "if it is not", stacklevel=3,
                )
                kind = "samples"
        return lambda batch: count_items(batch, kind)


class Trainer(ExactAccumulationMixin, transformers.Trainer):
    """``transformers.Trainer`` whose ``gradient_accumulation_steps`` give the big batch's update.

    Takes the ``Trainer``'s arguments, plus ``items`` (see :class:`ExactAccumulationMixin`).

    Example:
        >>> from gradaccum.transformers import Trainer  # doctest: +SKIP
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, items="samples")  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
    """
