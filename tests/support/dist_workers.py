"""Code that runs inside each rank of the distributed tests (spawned processes, gloo)."""

from __future__ import annotations

import gc
import os
import time
import traceback

import torch
import torch.distributed as dist

import gradaccum
from support.reference import RecordingSGD, TinyLM, lm_mean_loss


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


DEADLINE = 240


def spawn(fn, world: int, tmp_path, *args) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` processes; return each rank's result."""
    import torch.multiprocessing as mp

    store = os.path.join(str(tmp_path), "store")
    results = os.path.join(str(tmp_path), "result")
    ctx = mp.spawn(_entry, args=(world, store, results, fn, args), nprocs=world, join=False)
    deadline = time.time() + DEADLINE
    while not ctx.join(timeout=1):
        if time.time() > deadline:  # a hang is a failure, not a stalled suite
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"{fn.__name__} did not finish in {DEADLINE} s: a rank hangs")
    return [torch.load(f"{results}.{r}", weights_only=False) for r in range(world)]


def _entry(rank, world, store, results, fn, args):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        out = fn(rank, world, *args)
    except Exception as exc:  # report it to the test instead of hanging the other rank
        out = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    torch.save(out, f"{results}.{rank}")
    # Tear down together: a rank that destroys its group while the other still has gloo
    # work (or a DDP reducer) alive can abort the process at exit.
    gc.collect()
    dist.barrier()
    gradaccum.end_rank()  # exit 0 once written (a finished rank can abort in gloo's teardown)


def exact_lm(rank, world, wrap, per_rank_micro_batches, steps, sync_every=False):
    """Train a TinyLM wrapped in DDP or FSDP2; record weights and gradients per window."""
    torch.manual_seed(0)
    net = TinyLM()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    calls = []
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net)

        def hook(state, bucket):
            calls.append(bucket.buffer().numel())
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0] / world)

        model.register_comm_hook(None, hook)
    else:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(net)
    opt = RecordingSGD(model.parameters(), lr=0.5)
    acc = gradaccum.Accumulator(model, opt, steps=steps, sync_every_micro_batch=sync_every)
    before, reports, per_window_calls = [], [], []
    for window in acc.windows(per_rank_micro_batches[rank]):
        before.append([_full(p.detach()).clone() for p in model.parameters()])
        start = len(calls)
        for seqs in window:
            loss, n = lm_mean_loss(model, seqs)
            window.backward(loss, num_items=n)
        reports.append(window.step())
        per_window_calls.append(len(calls) - start)
    return {
        "init": init, "before": before, "reports": reports,
        "seen": [[_full(g) for g in step] for step in opt.seen], "calls": per_window_calls,
    }


def uneven_windows(rank, world, windows_per_rank):
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
    opt = RecordingSGD(model.parameters(), lr=0.1)
    acc = gradaccum.Accumulator(model, opt, steps=2)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(2, 3, generator=g), torch.randn(2, 1, generator=g)) for _ in range(2 * windows_per_rank[rank])]
    t0 = time.time()
    last_window = None
    try:
        for window in acc.windows(data):
            w0 = [p.detach().clone() for p in model.parameters()]
            seen = []
            for x, y in window:
                window.backward((model(x) - y).pow(2).mean(), num_items=2)
                if not window.is_stand_in:
                    seen.append((x, y))
            window.step()
            if seen:
                last_window = (torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen]), w0)
    except RuntimeError as exc:
        return {"message": str(exc), "seconds": time.time() - t0, "steps": acc.state.optimizer_step}
    return {"message": None, "seconds": time.time() - t0, "steps": acc.state.optimizer_step,
            "weight": model.module.weight.detach().clone(), "last_grads": opt.seen[-1], "last_window": last_window}


def cached_info_nce(rank, world, sizes_per_rank, k, gather=True):
    """A DDP bi-encoder trained with encode/backward_encoded over gathered representations."""
    from support.coupled import BiEncoder, info_nce, pair_batches

    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(BiEncoder())
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=k)
    data = pair_batches(sizes_per_rank[rank], seed=100 + rank)
    big = [0]
    real_all_reduce = dist.all_reduce

    def counting(tensor, *a, **kw):  # gradient all-reduces are the large ones
        big[0] += tensor.numel() > 100
        return real_all_reduce(tensor, *a, **kw)

    dist.all_reduce = counting
    reports = []
    try:
        for window in acc.windows(data):
            reps = [window.encode(model, b) for b in window]
            q, d = torch.cat([r[0] for r in reps]), torch.cat([r[1] for r in reps])
            if gather:
                q, d = window.gather(q), window.gather(d)
            window.backward_encoded(info_nce(q, d, model.module.log_scale))
            reports.append(window.step())
    except RuntimeError as exc:
        return {"message": str(exc)}
    finally:
        dist.all_reduce = real_all_reduce
    return {"message": None, "seen": opt.seen, "gradient_all_reduces": big[0],
            "stand_ins": [r.stand_ins for r in reports], "losses": [r.loss for r in reports]}


def token_budget_lm(rank, world):
    """A DDP TinyLM over token-budget windows: each rank's windows are cut on its own."""
    from gradaccum.data import TokenBudgetSampler
    from support.reference import make_sequences

    seqs = make_sequences(50, seed=8, lo=2, hi=40)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = RecordingSGD(model.parameters(), lr=0.0)
    sampler = TokenBudgetSampler([len(s) for s in seqs], window=8, max_tokens=60, seed=3)
    acc = gradaccum.Accumulator(model, opt, steps=sampler)
    loader = torch.utils.data.DataLoader(seqs, batch_sampler=sampler, collate_fn=list)
    for window in acc.windows(loader):
        for batch in window:
            loss, n = lm_mean_loss(model, batch)
            window.backward(loss, num_items=n)
        window.step()
    return {"seen": opt.seen, "plan": [len(w) for w in sampler.windows()],
            "windows": [[i for mb in w for i in mb] for w in sampler.windows()]}


ACCELERATE_SIZES = [[3, 5, 2, 4, 6, 1], [2, 4, 4, 1, 3, 5]]


def accelerate_exact(rank, world):
    """ExactAccelerator on the process group the test made (gloo), k=3, tokens per rank uneven."""
    import accelerate

    from gradaccum.accelerate import ExactAccelerator
    from support.reference import micro_batches

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29599")
    torch.manual_seed(0)
    model = TinyLM()
    accelerator = ExactAccelerator(gradient_accumulation_steps=3, cpu=True)
    opt = RecordingSGD(model.parameters(), lr=0.0)
    model, opt = accelerator.prepare(model, opt)
    calls = [0]

    def counting(state, bucket):
        calls[0] += 1
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, counting)
    buckets = []
    data = micro_batches(ACCELERATE_SIZES[rank], seed=40 + rank)
    for i, seqs in enumerate(data):
        with accelerator.accumulate(model):
            loss, n = lm_mean_loss(model, seqs)
            accelerator.backward(loss, num_items=n)
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                buckets.append(calls[0])
                calls[0] = 0
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    return {"seen": opt.optimizer.seen, "buckets_per_step": buckets}


def accelerate_terms(rank, world, max_grad_norm=None):
    """ExactAccelerator with a two-term loss (terms named, the first backpropagated by the loop),
    k=3, ranks' micro-batches differ; records the gradient at each step."""
    import accelerate

    from support import matrix_cells as mc
    from support import terms_cells as tc
    from gradaccum.accelerate import ExactAccelerator

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT="29598")
    model = tc.model()
    accelerator = ExactAccelerator(gradient_accumulation_steps=3, cpu=True, terms=["lm", "seq"])
    opt = RecordingSGD(model.parameters(), lr=0.0)
    model, opt = accelerator.prepare(model, opt)
    terms = []
    for batch in mc.rank_data("counts", rank, world):
        with accelerator.accumulate(model):
            accelerator.backward(mc.term_losses(model, batch))
            if max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                terms.append(accelerator.last_window_terms)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    return {"seen": [[g.float() for g in s] for s in opt.optimizer.seen], "terms": terms}


LIGHTNING_SIZES = [[3, 5, 2, 4, 6, 1], [2, 4, 4, 1, 3, 5]]


def lightning_terms(rank, world):
    """Lightning DDP with a two-term loss (terms named), k=3, ranks' micro-batches differ."""
    import lightning.pytorch as pl

    from support import matrix_cells as mc
    from support import terms_cells as tc
    from gradaccum.lightning import ExactAccumulation
    from support.lightning_modules import TermsModule

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29597")
    module = TermsModule(tc.model())
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=1, accumulate_grad_batches=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ExactAccumulation(terms=["lm", "seq"])],
                         use_distributed_sampler=False)
    trainer.fit(module, torch.utils.data.DataLoader(mc.rank_data("counts", rank, world), batch_size=None))
    return {"seen": [[g.float() for g in s] for s in module.opt.seen]}


def lightning_exact(rank, world):
    """Lightning DDP on the process group the test made (gloo), k=3, uneven tokens per rank."""
    import lightning.pytorch as pl

    from gradaccum.lightning import ExactAccumulation
    from support.reference import micro_batches

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT="29598")
    calls, buckets = [0], []

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = TinyLM()

        def training_step(self, seqs, batch_idx):
            loss, n = lm_mean_loss(self.net, seqs)
            return {"loss": loss, "num_items": n}

        def configure_optimizers(self):
            from support.lightning_modules import RecordingSGD as ClosureFirstSGD

            self.rec = ClosureFirstSGD(self.parameters(), lr=0.0)
            return self.rec

        def on_train_start(self):
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            def counting(state, bucket):
                calls[0] += 1
                return default_hooks.allreduce_hook(state, bucket)

            self.trainer.strategy.model.register_comm_hook(None, counting)

        def on_before_optimizer_step(self, optimizer):
            buckets.append(calls[0])
            calls[0] = 0

    module = Module()
    trainer = pl.Trainer(accelerator="cpu", devices=world, strategy="ddp", max_epochs=1, accumulate_grad_batches=3,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ExactAccumulation()], use_distributed_sampler=False)
    data = micro_batches(LIGHTNING_SIZES[rank], seed=60 + rank)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return {"seen": module.rec.seen, "buckets_per_step": buckets}
