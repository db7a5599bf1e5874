"""Wall time per optimizer step: gradaccum against the plain hand-written loop.

Same model, optimizer and in-memory micro-batches; the two loops alternate step by step
(this machine is noisy, and drift between whole runs swamped a few percent). Prints the
median seconds per optimizer step of each, their ratio, and the range of the ratio over
blocks of steps. Target: ratio <= 1.03 on the MLP.

    python benchmarks/overhead.py [--repeats 8] [--steps 100] [--cases mlp,transformer,accelerate]

``lightning``: a whole ``Trainer.fit`` of 8 optimizer steps on the MLP, stock against
``ExactAccumulation`` (Lightning's own per-fit start-up is in both). Both log a training
loss, as a real run does: the stock module with ``self.log`` in ``training_step``, the
callback once per window; Lightning's ``log`` is most of what either adds.
``accelerate``: the same MLP in a loop written for Accelerate (``accelerator.accumulate``,
``accelerator.backward``), stock ``Accelerator`` against ``gradaccum.accelerate.ExactAccelerator``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
import torch.nn.functional as F

import gradaccum


def mlp_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    data = [(torch.randn(32, 784), torch.randint(0, 10, (32,))) for _ in range(64)]
    return model, data, lambda m, b: F.cross_entropy(m(b[0]), b[1]), lambda b: len(b[1])


def transformer_case():
    torch.manual_seed(0)
    vocab, dim = 1000, 128

    class Small(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(vocab, dim)
            layer = torch.nn.TransformerEncoderLayer(dim, 4, 256, dropout=0.0, batch_first=True)
            self.enc = torch.nn.TransformerEncoder(layer, 2)
            self.head = torch.nn.Linear(dim, vocab)

        def forward(self, ids):
            return self.head(self.enc(self.emb(ids)))

    data = [torch.randint(0, vocab, (8, 64)) for _ in range(64)]

    def loss(m, ids):
        logits = m(ids)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, vocab), ids[:, 1:].reshape(-1))

    return Small(), data, loss, lambda ids: ids[:, 1:].numel()


def plain_stepper(model, opt, data, loss_fn, k):
    stream = itertools.cycle(data)

    def step():  # the seeds' loop: loss / k, backward, step after k micro-batches
        for _ in range(k):
            (loss_fn(model, next(stream)) / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def gradaccum_stepper(model, opt, data, loss_fn, count, k):
    acc = gradaccum.Accumulator(model, opt, steps=k)
    windows = acc.windows(itertools.cycle(data))

    def step():
        window = next(windows)
        for batch in window:
            window.backward(loss_fn(model, batch), num_items=count(batch))
        window.step()

    return step


def accelerate_stepper(model, data, loss_fn, count, k, exact):
    """A loop written for Accelerate: stock ``Accelerator`` or ``ExactAccelerator`` (``num_items``)."""
    import accelerate

    from gradaccum.accelerate import ExactAccelerator

    accelerator = (ExactAccelerator if exact else accelerate.Accelerator)(gradient_accumulation_steps=k, cpu=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model, opt = accelerator.prepare(model, opt)
    stream = itertools.cycle(data)

    def step():
        for _ in range(k):
            batch = next(stream)
            with accelerator.accumulate(model):
                loss = loss_fn(model, batch)
                if exact:
                    accelerator.backward(loss, num_items=count(batch))
                else:
                    accelerator.backward(loss)
                opt.step()
                opt.zero_grad(set_to_none=True)

    return step


def lightning_stepper(model, data, loss_fn, count, k, exact):
    """A Lightning fit of ``steps`` optimizer steps per call: stock, or with ``ExactAccumulation``."""
    import lightning.pytorch as pl

    from gradaccum.lightning import ExactAccumulation

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            loss = loss_fn(self.net, batch)
            if exact:  # the callback logs train_loss, the window's item-weighted mean
                return {"loss": loss, "num_items": count(batch)}
            self.log("train_loss", loss)  # what a stock module does to see its loss
            return loss

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    module = Module()
    loader = torch.utils.data.DataLoader(data, batch_size=None)

    def step():
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=len(data) // k, accumulate_grad_batches=k,
                             logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[ExactAccumulation()] if exact else [])
        trainer.fit(module, loader)

    return step


def measure(name, case, k, steps, repeats, framework="plain"):
    """Alternate the two loops optimizer step by optimizer step (flipping who goes first),
    so that the machine's drift hits both alike; a block of ``steps`` steps gives a ratio."""
    model, data, loss_fn, count = case()
    if framework in ("accelerate", "lightning"):
        import copy

        make = accelerate_stepper if framework == "accelerate" else lightning_stepper
        plain = make(copy.deepcopy(model), data, loss_fn, count, k, exact=False)
        ours = make(model, data, loss_fn, count, k, exact=True)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        plain = plain_stepper(model, opt, data, loss_fn, k)
        ours = gradaccum_stepper(model, opt, data, loss_fn, count, k)
    for _ in range(5):  # warm-up
        plain()
        ours()
    times = {plain: [], ours: []}
    ratios = []
    for _r in range(repeats):
        block = {plain: [], ours: []}
        for s in range(steps):
            for fn in (plain, ours) if s % 2 == 0 else (ours, plain):
                t0 = time.perf_counter()
                fn()
                block[fn].append(time.perf_counter() - t0)
        ratios.append(statistics.median(block[ours]) / statistics.median(block[plain]))
        for fn in times:
            times[fn] += block[fn]
    p, g = statistics.median(times[plain]), statistics.median(times[ours])
    print(
        f"{name:<34} {'stock' if framework != 'plain' else 'plain'} {p * 1e3:8.3f} ms/step   gradaccum {g * 1e3:8.3f} ms/step   "
        f"ratio {g / p:.3f}   (blocks {min(ratios):.3f}-{max(ratios):.3f})"
    )
    return g / p


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=8, help="blocks of steps, one ratio each")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per block for each loop")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads; 1 keeps a 2-core machine's noise down")
    ap.add_argument("--cases", default="mlp,transformer", help="comma-separated: mlp, transformer, accelerate, lightning")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = args.cases.split(",")
    if "mlp" in cases:
        measure("MLP 784-256-10, micro-batch 32, k=8", mlp_case, 8, args.steps, args.repeats)
    if "lightning" in cases:
        # One call is a whole fit of 8 optimizer steps (64 micro-batches): the Trainer's start-up included.
        measure("Lightning: stock vs ExactAccumulation, MLP, k=8 (one fit of 8 steps)", mlp_case, 8,
                max(3, args.steps // 20), args.repeats, "lightning")
    if "accelerate" in cases:
        measure("Accelerate: stock vs ExactAccelerator, MLP, k=8", mlp_case, 8, args.steps, args.repeats, "accelerate")
    if "transformer" in cases:
        measure("transformer 2x128, 8x64 tokens, k=4", transformer_case, 4, max(5, args.steps // 10), args.repeats)


if __name__ == "__main__":
    main()
