"""gradaccum.lightning.ExactAccumulation against the float64 big batch; stock Lightning as the control."""

from __future__ import annotations

import copy

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from gradaccum.lightning import ExactAccumulation  # noqa: E402
from support.lightning_modules import Module, RecordingSGD, TermsModule  # noqa: E402,F401
from support.reference import TinyLM, big_batch_lm_grads, lm_mean_loss, micro_batches, rel_error  # noqa: E402


def fit(net, data, k, exact=True, clip=None, callbacks=(), **kw):
    module = Module(net, exact)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=k,
                         gradient_clip_val=clip, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=([ExactAccumulation()] if exact else []) + list(callbacks), **kw)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return module.opt.seen, trainer


@pytest.mark.parametrize("clip", [None, 0.05])
def test_exact_accumulation_equals_the_big_batch_and_stock_does_not(clip):
    sizes = [3, 5, 2, 4, 6, 1, 3, 4, 5, 2]  # k=4: two full windows and a partial one of 2
    data = micro_batches(sizes, seed=5)
    torch.manual_seed(0)
    net = TinyLM()
    exact, trainer = fit(copy.deepcopy(net), data, 4, clip=clip)
    stock, _ = fit(copy.deepcopy(net), data, 4, exact=False, clip=clip)
    assert len(exact) == len(stock) == 3
    err_exact, err_stock = [], []
    for w, (got, base) in enumerate(zip(exact, stock)):
        want = big_batch_lm_grads(net, data[4 * w: 4 * w + 4])
        if clip:
            norm = sum(float(x.pow(2).sum()) for x in want) ** 0.5
            want = [x * min(1.0, clip / (norm + 1e-6)) for x in want]
        err_exact.append(rel_error(got, want))
        err_stock.append(rel_error(base, want))
    assert max(err_exact) < 1e-5, err_exact
    assert max(err_stock) > 0.05, err_stock
    # The logged train_loss is the last window's item-weighted mean.
    total = sum(lm_mean_loss(net, s)[0].item() * lm_mean_loss(net, s)[1] for s in data[8:])
    items = sum(lm_mean_loss(net, s)[1] for s in data[8:])
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(total / items, rel=1e-5)


def test_several_terms_equal_the_big_batch():
    # The sequence term is absent from some micro-batches (the first among them); k=4 over 10:
    # windows of 4, 4 and a partial 2; clipped at 0.05.
    from support import matrix_cells as mc
    from support import terms_cells as tc

    data = mc.rank_data("counts", 1, 2) + mc.rank_data("counts", 0, 1)[:4]
    net = tc.model()
    module = TermsModule(copy.deepcopy(net))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, accumulate_grad_batches=4, gradient_clip_val=0.05,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ExactAccumulation()])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert len(module.opt.seen) == 3
    for w, got in enumerate(module.opt.seen):
        want, values = tc.reference(net, data[4 * w: 4 * w + 4])
        norm = sum(float(x.pow(2).sum()) for x in want) ** 0.5
        assert rel_error(got, [x * min(1.0, 0.05 / (norm + 1e-6)) for x in want]) < 1e-5, w
    assert float(trainer.callback_metrics["train_loss/seq"]) == pytest.approx(values["seq"], rel=1e-5)
    assert float(trainer.callback_metrics["train_loss"]) == pytest.approx(sum(values.values()), rel=1e-5)


def test_refusals_are_clear():
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    data = micro_batches([2, 2], seed=1)
    with pytest.raises(ValueError, match="GradientAccumulationScheduler"):
        fit(TinyLM(), data, 1, callbacks=[GradientAccumulationScheduler({0: 2})])


def test_checkpoint_and_resume(tmp_path):
    data = micro_batches([3, 5, 2, 4, 6, 1, 3, 4], seed=7)
    torch.manual_seed(0)
    net = TinyLM()

    class Adam(Module):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    def trainer(epochs, **kw):
        return pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, accumulate_grad_batches=2,
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          callbacks=[ExactAccumulation()], default_root_dir=str(tmp_path), **kw)

    loader = torch.utils.data.DataLoader(data, batch_size=None)
    straight = Adam(copy.deepcopy(net))
    trainer(2, enable_checkpointing=False).fit(straight, loader)
    first = Adam(copy.deepcopy(net))
    t = trainer(1)
    t.fit(first, loader)
    resumed = Adam(copy.deepcopy(net))
    trainer(2, enable_checkpointing=False).fit(resumed, loader, ckpt_path=t.checkpoint_callback.best_model_path)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.multiprocess
def test_several_terms_on_two_ddp_ranks(tmp_path):
    from support import dist_workers
    from support import matrix_cells as mc
    from support import terms_cells as tc

    results = dist_workers.spawn(dist_workers.lightning_terms, 2, tmp_path)
    assert all(r.get("error") is None for r in results), results
    data = [mc.rank_data("counts", r, 2) for r in range(2)]
    net = tc.model()
    for w in range(2):
        want, _ = tc.reference(net, data[0][3 * w: 3 * w + 3] + data[1][3 * w: 3 * w + 3])
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5


@pytest.mark.multiprocess
def test_ddp_two_ranks(tmp_path):
    from support import dist_workers

    results = dist_workers.spawn(dist_workers.lightning_exact, 2, tmp_path)
    assert all(r.get("error") is None for r in results), results
    torch.manual_seed(0)
    net = TinyLM()
    per_rank = [micro_batches(s, seed=60 + r) for r, s in enumerate(dist_workers.LIGHTNING_SIZES)]
    for w in range(len(results[0]["seen"])):
        want = big_batch_lm_grads(net, [mb for r in range(2) for mb in per_rank[r][3 * w: 3 * w + 3]])
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5
    for r in results:
        assert r["buckets_per_step"] == [1] * len(r["seen"])


def _setup_with(strategy):
    class Trainer:  # what setup() reads of a Trainer, with the strategy under test
        callbacks = []

    Trainer.strategy = strategy
    ExactAccumulation().setup(Trainer(), Module(TinyLM()), "fit")


def test_unknown_strategies_are_refused_at_fit():
    from lightning.pytorch import strategies

    with pytest.raises(ValueError, match="ExactAccumulation under ModelParallelStrategy: supported are one device, DDP, FSDP"):
        _setup_with(strategies.ModelParallelStrategy.__new__(strategies.ModelParallelStrategy))
    _setup_with(strategies.SingleDeviceStrategy(device=torch.device("cpu")))  # accepted
    _setup_with(strategies.DeepSpeedStrategy.__new__(strategies.DeepSpeedStrategy))  # accepted


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_strategy_equals_the_big_batch_and_stock_does_not(tmp_path, stage):
    # Two windows of k=4 micro-batches of different token counts, SGD. Stock Lightning under
    # DeepSpeed divides by k twice (its own 1/k, and DeepSpeed's backward again).
    pytest.importorskip("deepspeed")
    from support import dist_workers
    from support import deepspeed_workers

    got = dist_workers.spawn(deepspeed_workers.lightning, 1, tmp_path, stage, True)[0]
    assert "error" not in got, got.get("trace")
    reference = TinyLM().double()
    with torch.no_grad():
        for p, v in zip(reference.parameters(), got["before"]):
            p.copy_(v)
    for w in range(2):  # plain SGD on each window's float64 big batch
        grads = big_batch_lm_grads(reference, got["data"][4 * w: 4 * w + 4])
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= deepspeed_workers.LR * g
    want = [p.detach() - b for p, b in zip(reference.parameters(), got["before"])]
    assert rel_error([a - b for a, b in zip(got["after"], got["before"])], want) < 1e-4
    if stage == 2:
        (tmp_path / "stock").mkdir()
        stock = dist_workers.spawn(deepspeed_workers.lightning, 1, tmp_path / "stock", stage, False)[0]
        assert rel_error([a - b for a, b in zip(stock["after"], stock["before"])], want) > 0.5  # 0.775 measured
