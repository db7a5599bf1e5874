"""What only a CUDA GPU can show: host syncs, GradScaler on CUDA, NCCL at world size 1, and
the Lightning, Transformers and DeepSpeed paths on a GPU. Skipped without CUDA; ``make gpu``
runs them all, with the GPU benchmark, in one command (``benchmarks/gpu_suite.py``)."""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch

import gradaccum
from support.reference import RecordingSGD, TinyLM, big_batch_lm_grads, lm_mean_loss, micro_batches, rel_error

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu)")]

SIZES = [3, 5, 2, 4, 6, 1, 3, 4, 5, 2]  # k=4: two full windows and a partial one of 2


def _on(device, data):
    return [[s.to(device) for s in mb] for mb in data]


def _syncs(fn) -> int:
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _count_tensor(seqs):
    return torch.tensor(float(sum(len(s) - 1 for s in seqs)), device=seqs[0].device)


def _train_counting(model, opt, data, k=4):
    """Per micro-batch and per step host syncs of a window loop with device-side counts."""
    acc = gradaccum.Accumulator(model, opt, steps=k, max_grad_norm=1.0, precision="bf16")
    per_micro, per_step = [], []
    for window in acc.windows(data):
        for seqs in window:
            n = _count_tensor(seqs)

            def micro(seqs=seqs, n=n):
                with window.autocast():
                    loss, _ = lm_mean_loss(model, seqs)
                window.backward(loss, num_items=n)

            per_micro.append(_syncs(micro))
        per_step.append(_syncs(window.step))
    return per_micro, per_step


def test_one_process_syncs_once_per_step_and_never_per_micro_batch():
    torch.manual_seed(0)
    model = TinyLM().cuda()
    data = _on("cuda", micro_batches(SIZES, seed=5))
    per_micro, per_step = _train_counting(model, RecordingSGD(model.parameters(), lr=0.0), data)
    assert per_micro == [0] * len(SIZES) and max(per_step) <= 1, (per_micro, per_step)


@pytest.mark.parametrize("wrap", ["ddp", "fsdp2"])
def test_ddp_and_fsdp2_over_nccl_sync_once_per_step(wrap):
    import torch.distributed as dist

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        net = TinyLM().cuda()
        if wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[0])
        else:
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(net)
        data = _on("cuda", micro_batches(SIZES, seed=5))
        per_micro, per_step = _train_counting(model, RecordingSGD(model.parameters(), lr=0.0), data)
        assert max(per_micro) == 0 and max(per_step) <= 1, (per_micro, per_step)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_precisions_on_cuda_equal_the_float64_big_batch(precision):
    torch.manual_seed(0)
    net = TinyLM()
    model = copy.deepcopy(net).cuda()
    opt = RecordingSGD(model.parameters(), lr=0.0)
    data = micro_batches(SIZES, seed=5)
    acc = gradaccum.Accumulator(model, opt, steps=4, precision=precision)
    for window in acc.windows(_on("cuda", data)):
        for seqs in window:
            with window.autocast():
                loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=_count_tensor(seqs))
        window.step()
    tol = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 3e-3}[precision]
    for w, got in enumerate(opt.seen):
        assert rel_error([g.cpu() for g in got], big_batch_lm_grads(net, data[4 * w:4 * w + 4])) < tol


def test_lightning_fsdp_strategy_updates_as_the_big_batch():
    # FSDPStrategy (FSDP1, use_orig_params): the weights after three windows against plain SGD
    # on each window's float64 big batch. Weights, not .grad: FSDP writes gradients back to
    # the original parameters on its own schedule, the update is what must be right.
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.strategies import FSDPStrategy

    from gradaccum.lightning import ExactAccumulation

    lr = 0.5

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, seqs, batch_idx):
            loss, n = lm_mean_loss(self.net, seqs)
            return {"loss": loss, "num_items": n}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=lr)

    data = micro_batches(SIZES, seed=5)
    torch.manual_seed(0)
    net = TinyLM()
    module = Module(copy.deepcopy(net))
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=FSDPStrategy(use_orig_params=True), max_epochs=1,
                         accumulate_grad_batches=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[ExactAccumulation()])
    trainer.fit(module, torch.utils.data.DataLoader(_on("cuda", data), batch_size=None))
    reference = copy.deepcopy(net).double()
    for w in range(3):
        grads = big_batch_lm_grads(reference, data[4 * w:4 * w + 4])
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
    moved = [p.detach() - q.detach().double() for p, q in zip(reference.parameters(), net.parameters())]
    got = [p.detach().double().cpu() - q.detach().double() for p, q in zip(module.net.parameters(), net.parameters())]
    assert rel_error(got, moved) < 1e-5


def test_transformers_trainer_on_cuda_equals_the_big_batch(tmp_path):
    transformers = pytest.importorskip("transformers")
    from gradaccum.transformers import Trainer
    from support.hf import gpt2_lm, max_diff, pad_collator, train, variable_length_rows

    data, collate = variable_length_rows(30, causal=True), pad_collator(causal=True)
    big = train(transformers.Trainer, gpt2_lm(), data, collate, tmp_path, batch=12, k=1, own_mean=True, use_cpu=False)
    exact = train(Trainer, gpt2_lm(), data, collate, tmp_path, batch=4, k=3, use_cpu=False)
    assert max_diff(exact, big) < 1e-4, max_diff(exact, big)


def test_deepspeed_zero2_on_one_gpu_equals_the_big_batch(monkeypatch):
    deepspeed = pytest.importorskip("deepspeed")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29631")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    torch.manual_seed(0)
    net = TinyLM()
    lr = 0.5
    model = copy.deepcopy(net)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
              "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                                                   config=config)
    data = micro_batches(SIZES, seed=5)
    acc = gradaccum.Accumulator(engine, optimizer, steps=4)
    for window in acc.windows(_on(engine.device, data)):
        for seqs in window:
            loss, n = lm_mean_loss(engine, seqs)
            window.backward(loss, num_items=n)
        window.step()
    reference = copy.deepcopy(net).double()
    for w in range(3):
        grads = big_batch_lm_grads(reference, data[4 * w:4 * w + 4])
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
    got = [p.detach().double().cpu() for p in engine.module.parameters()]
    assert rel_error(got, [p.detach() for p in reference.parameters()]) < 1e-5
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.pop("MASTER_PORT", None)
