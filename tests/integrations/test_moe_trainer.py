"""Router load-balancing losses of MoE models through ``gradaccum.transformers.Trainer``, with
nothing else changed (the model's ``output_router_logits`` and ``router_aux_loss_coef``).

Each step's gradient (lr 0, no clipping: every step starts from the same weights) against
two big batches of the same 12 rows: an independent float64 forward of the initial model
(transformers' own masked load-balancing loss over the whole batch), and the stock Trainer
at batch 12 without accumulation. The stock Trainer with accumulation is the control.
"""

from __future__ import annotations


import pytest
import torch

transformers = pytest.importorskip("transformers")

from gradaccum.transformers import Trainer  # noqa: E402
from support import moe  # noqa: E402
from support.hf import pad_collator, variable_length_rows  # noqa: E402
from support.reference import rel_error  # noqa: E402


class Gradients(transformers.TrainerCallback):
    """The gradient each optimizer step is about to apply."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append([p.grad.detach().double().clone() if p.grad is not None else torch.zeros_like(p, dtype=torch.float64)
                           for p in model.parameters()])


def _recording(cls):
    class Recording(cls):
        """Keeps the batches it trained on (the big batches' rows, for the float64 reference)."""

        seen: list = []

        def compute_loss(self, model, inputs, *args, **kwargs):
            type(self).seen.append({k: v.detach().clone() for k, v in inputs.items()})
            return super().compute_loss(model, inputs, *args, **kwargs)

    Recording.seen = []
    return Recording


def run(trainer_cls, family, data, collate, tmp_path, batch, k, **overrides):
    model = moe.model(family, **overrides)
    grads = Gradients()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{family}-{trainer_cls.__name__}-{batch}x{k}"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=k, num_train_epochs=1, learning_rate=0.0, max_grad_norm=0.0, seed=7, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    trainer = trainer_cls(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[grads])
    if batch * k == 12 and k == 1:
        trainer.model_accepts_loss_kwargs = False  # the model's own mean over the big batch
    trainer.train()
    return grads.steps, trainer


def float64_big_batch(family, batches):
    """The float64 gradient of the initial model's own loss (mean + coef x aux) on each big batch."""
    model = moe.model(family).double()
    out = []
    for inputs in batches:
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()
        out.append([p.grad.detach().clone() for p in model.parameters()])
    return out


@pytest.mark.parametrize("family", list(moe.FAMILIES))
def test_router_loss_windows_equal_the_big_batch(tmp_path, family):
    data, collate = variable_length_rows(24, causal=True), pad_collator(causal=True)  # 3-30 tokens each
    big_cls = _recording(transformers.Trainer)
    big, _ = run(big_cls, family, data, collate, tmp_path, batch=12, k=1)
    exact, trainer = run(Trainer, family, data, collate, tmp_path, batch=4, k=3)
    want = float64_big_batch(family, big_cls.seen)
    assert len(exact) == len(big) == len(want) == 2
    for step in range(2):
        assert rel_error(exact[step], want[step]) < 1e-5, (step, rel_error(exact[step], want[step]))
        assert rel_error(exact[step], big[step]) < 1e-5
    if family == "mixtral":  # stock accumulation adds each micro-batch's router loss whole, its mean / k
        stock, _ = run(transformers.Trainer, family, data, collate, tmp_path, batch=4, k=3)
        assert max(rel_error(stock[s], want[s]) for s in range(2)) > 0.02
    tokens = trainer.tokens_per_expert  # the last window's assignments: top-2 of every real token, 2 layers
    rows = sum(int(m.sum()) for m in [b["attention_mask"] for b in big_cls.seen[1:]])
    assert tokens is not None and len(tokens) == 4 and sum(tokens) == pytest.approx(2 * 2 * rows)


def test_dropout_and_router_jitter_route_alike_in_both_passes(tmp_path, monkeypatch):
    # Jitter noise multiplies every router input by random numbers in training: the counting
    # forward and the training forward must draw the same ones (the RNG is replayed).
    data, collate = variable_length_rows(24, causal=True), pad_collator(causal=True)
    noisy = dict(router_jitter_noise=0.3)
    run(Trainer, "mixtral", data, collate, tmp_path / "replayed", batch=4, k=3, **noisy)  # no mismatch raised
    from gradaccum.transformers import _router
    import contextlib

    real = _router.WindowRouting.replay

    @contextlib.contextmanager
    def without_rng(self, inputs, device):  # the batch is named, its RNG state is not restored
        self.rng = {}
        with real(self, inputs, device):
            yield

    monkeypatch.setattr(_router.WindowRouting, "replay", without_rng)
    with pytest.raises(RuntimeError, match="routed .* differently"):
        run(Trainer, "mixtral", data, collate, tmp_path / "not-replayed", batch=4, k=3, **noisy)


@pytest.mark.multiprocess
def test_two_ranks_equal_the_one_process_big_batch(tmp_path):
    # 2 ranks x micro-batch 2 x k=3 of uneven tokens, AdamW: the router loss counted over both
    # ranks' windows; the same weights as the stock Trainer at batch 12 in one process.
    import subprocess
    import sys

    from support import launch
    from support.hf import max_diff, train

    weights = tmp_path / "rank0.pt"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "support.hf_trainer_worker", str(weights), "none", "moe"],
                          capture_output=True, text=True, env=launch.env(), timeout=300, cwd=tmp_path)
    assert launch.finished(proc), proc.stderr[-3000:]
    data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
    big = train(transformers.Trainer, moe.model("mixtral"), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    stock = train(transformers.Trainer, moe.model("mixtral"), data, collate, tmp_path / "stock", batch=4, k=3)
    got = torch.load(weights)
    diff = max(float((got[k] - v).abs().max()) for k, v in big.state_dict().items())
    assert diff < 1e-5, diff
    assert max_diff(stock, big) > 100 * max(diff, 1e-7)  # the control: stock accumulation moved elsewhere
