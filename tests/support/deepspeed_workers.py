"""Code that runs inside each rank of the DeepSpeed tests (spawned processes, gloo, CPU)."""

from __future__ import annotations

import os

import torch

import gradaccum
from support.reference import TinyLM, lm_mean_loss, make_sequences, micro_batches

LR = 0.1
# Rank 0 has 7 micro-batches, rank 1 has 6: with k=4 the last windows are partial and uneven.
SIZES = [[3, 1, 4, 2, 2, 1, 3], [2, 2, 5, 1, 1, 2]]


def environment(rank: int, world: int) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29611")


def engine_for(stage: int, extra: dict | None = None, seed: int = 0):
    """A TinyLM under ``deepspeed.initialize`` with plain SGD, as a user would write it."""
    import deepspeed

    torch.manual_seed(seed)
    net = TinyLM()
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10**9, "comms_logger": {"enabled": True, "prof_all": True}}
    config.update(extra or {})
    engine, optimizer, _, _ = deepspeed.initialize(model=net, optimizer=opt, config=config)
    return engine, optimizer


def full_weights(engine) -> list[torch.Tensor]:
    """Every parameter in full and in fp32 (ZeRO-3 gathers; bf16 runs read the fp32 master)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = []
    for p in engine.module.parameters():
        full = safe_get_full_fp32_param(p)
        out.append((full if full is not None else p).detach().double().clone())
    return out


def _sent() -> dict[str, int]:
    """Bytes DeepSpeed's own collectives sent so far, by kind (its comms logger)."""
    import deepspeed.comm as ds_comm

    totals: dict[str, int] = {}
    for op, sizes in ds_comm.comms_logger.comms_dict.items():
        totals[op] = totals.get(op, 0) + sum(int(size) * int(v[0]) for size, v in sizes.items())
    return totals


def loaders(rank: int, scenario: str):
    """(loader, steps) of one scenario: fixed k with uneven ranks, a callable k, token budgets."""
    if scenario == "budget":
        from gradaccum.data import TokenBudgetSampler

        seqs = make_sequences(36, seed=8, lo=2, hi=30)
        sampler = TokenBudgetSampler([len(s) for s in seqs], window=8, max_tokens=50, seed=3)
        return torch.utils.data.DataLoader(seqs, batch_sampler=sampler, collate_fn=list), sampler
    data = micro_batches(SIZES[rank], seed=1 + rank)
    return data, (4 if scenario == "fixed" else (lambda step: (3, 2)[step % 2]))


def exact(rank, world, stage, scenario, extra=None, clip=None, sync_every=False):
    """Train through gradaccum over a DeepSpeed engine; record weights, windows and traffic."""
    environment(rank, world)
    engine, optimizer = engine_for(stage, extra)
    loader, steps = loaders(rank, scenario)
    acc = gradaccum.Accumulator(engine, optimizer, steps=steps, max_grad_norm=clip, sync_every_micro_batch=sync_every)
    weights, windows, reports, traffic = [full_weights(engine)], [], [], []
    for window in acc.windows(loader):
        sent = _sent()
        real = []
        for batch in window:
            loss, n = lm_mean_loss(engine, batch)
            window.backward(loss, num_items=n)
            if not window.is_stand_in:
                real.append(batch)
        reports.append(window.step())
        after = _sent()
        traffic.append({op: after[op] - sent.get(op, 0) for op in after if after[op] != sent.get(op, 0)})
        windows.append(real)
        weights.append(full_weights(engine))
    return {"weights": weights, "windows": windows, "reports": reports, "traffic": traffic,
            "micro_batches": [len(w) for w in windows]}


def exact_runs(rank, world, runs: dict) -> dict:
    """Several ``exact`` runs one after another in one launch: ``{name: args}`` to
    ``{name: result}`` (a failed run's result holds its error and trace)."""
    import traceback

    out = {}
    for name, args in runs.items():
        try:
            out[name] = exact(rank, world, *args)
        except Exception as exc:  # reported to its own test
            out[name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    return out


def stock(rank, world, stage, k):
    """DeepSpeed's own loop over the same data: engine.backward divides by k (the seeds' loop)."""
    environment(rank, world)
    engine, _ = engine_for(stage, {"gradient_accumulation_steps": k})
    data = micro_batches(SIZES[rank][:k], seed=1 + rank)
    before = full_weights(engine)
    for batch in data:
        loss, _ = lm_mean_loss(engine, batch)
        engine.backward(loss)
        engine.step()
    return {"before": before, "after": full_weights(engine), "window": data}


def checkpoint(rank, world, stage, directory, phase):
    """Windows 1-2, save at the boundary (engine + accumulator), then windows 3-4 in a fresh
    engine loaded from it; ``phase='straight'`` runs all four in one go."""
    environment(rank, world)
    data = micro_batches([2, 3, 1, 2, 4, 1, 2, 2][::1 if rank == 0 else -1], seed=5 + rank)
    engine, optimizer = engine_for(stage, seed=0)
    acc = gradaccum.Accumulator(engine, optimizer, steps=2)
    refused = None

    def run(batches):
        nonlocal refused
        for window in acc.windows(batches):
            for i, batch in enumerate(window):
                loss, n = lm_mean_loss(engine, batch)
                window.backward(loss, num_items=n)
                if i == 0 and refused is None and stage > 0:
                    try:
                        acc.state_dict()  # mid-window under ZeRO: refused, with the way out
                    except RuntimeError as exc:
                        refused = str(exc)
            window.step()

    if phase == "straight":
        run(data)
    else:
        run(data[:4])
        engine.save_checkpoint(directory, tag="w2")
        torch.save(acc.state_dict(), os.path.join(directory, f"acc-{rank}.pt"))
        engine, optimizer = engine_for(stage, seed=123)  # other weights: the load must replace them
        engine.load_checkpoint(directory, tag="w2")
        acc = gradaccum.Accumulator(engine, optimizer, steps=2)
        acc.load_state_dict(torch.load(os.path.join(directory, f"acc-{rank}.pt")))
        run(data[4:])
    return {"weights": full_weights(engine), "steps": acc.state.optimizer_step, "refused": refused}


def refusals(rank, world):
    """What cannot hold under DeepSpeed is refused when the Accumulator is built, or at the call."""
    environment(rank, world)
    engine, optimizer = engine_for(2, {"gradient_clipping": 1.0})
    out = {}
    attempts = {
        "accum_dtype": dict(accum_dtype=torch.float64),
        "compact": dict(compact_embedding_grads=True),
        "precision": dict(precision="bf16"),
        "clip": dict(max_grad_norm=0.5),
        "optimizer": dict(optimizer=torch.optim.SGD(TinyLM().parameters(), lr=0.1)),
    }
    for name, kwargs in attempts.items():
        kw = {"optimizer": optimizer, **kwargs}
        try:
            gradaccum.Accumulator(engine, kw.pop("optimizer"), steps=2, **kw)
            out[name] = None
        except (TypeError, ValueError) as exc:
            out[name] = str(exc)
    import warnings

    gas_engine, gas_optimizer = engine_for(2, {"gradient_accumulation_steps": 3, "train_batch_size": 3 * world})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gradaccum.Accumulator(gas_engine, gas_optimizer, steps=2)
    out["notices"] = [str(w.message) for w in caught if "gradient_accumulation_steps" in str(w.message)]
    acc = gradaccum.Accumulator(engine, optimizer, steps=2, max_grad_norm=1.0)  # the same norm: accepted
    for window in acc.windows(micro_batches([2, 2], seed=rank)):
        for i, batch in enumerate(window):
            try:
                window.encode(lambda b: engine(b[0][None]), batch)
            except NotImplementedError as exc:
                out["encode"] = str(exc)
            loss, n = lm_mean_loss(engine, batch)
            window.backward(loss, num_items=n)
            if i == 0:  # a second Accumulator on the engine while this one's window is half done
                try:
                    gradaccum.Accumulator(engine, optimizer, steps=2, max_grad_norm=1.0)
                except RuntimeError as exc:
                    out["second"] = str(exc)
        try:
            window.finish()
        except RuntimeError as exc:
            out["finish"] = str(exc)
        out["report"] = window.step()
    return out


def accelerate_exact(rank, world, stage, guard, clip=0.05):
    """ExactAccelerator with Accelerate's DeepSpeed plugin, k=3, uneven tokens per rank; the
    loop of docs/accelerate.md (clip_grad_norm_ every micro-batch unless ``guard``)."""
    environment(rank, world)
    import accelerate
    from accelerate.utils import DeepSpeedPlugin

    from gradaccum.accelerate import ExactAccelerator

    torch.manual_seed(0)
    model = TinyLM()
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=3, gradient_clipping=clip)
    plugin.deepspeed_config.update(zero_allow_untested_optimizer=True, train_micro_batch_size_per_gpu=1, train_batch_size=3 * world)
    accelerator = ExactAccelerator(gradient_accumulation_steps=3, deepspeed_plugin=plugin)  # not cpu=True: that drops DeepSpeed
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    data = micro_batches(SIZES[rank][:6], seed=1 + rank)
    model, optimizer = accelerator.prepare(model, optimizer)
    engine = accelerator.deepspeed_engine_wrapped.engine
    weights, windows, norms, real = [full_weights(engine)], [], [], []
    norm = None
    for seqs in data:
        with accelerator.accumulate(model):
            loss, n = lm_mean_loss(model, seqs)
            accelerator.backward(loss, num_items=n)
            real.append(seqs)
            if clip and (accelerator.sync_gradients or not guard):
                norm = accelerator.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                norms.append(float(norm) if norm is not None else float("nan"))
                weights.append(full_weights(engine))
                windows.append(real)
                real = []
    refused = None
    try:
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
    except ValueError as exc:
        refused = str(exc)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    return {"weights": weights, "windows": windows, "norms": norms, "refused": refused}


def lightning(rank, world, stage, exact):
    """Lightning's DeepSpeedStrategy with ExactAccumulation (or stock), k=4, SGD; the weights
    before and after. Lightning runs that strategy on CUDA only: the test's subclass lifts that
    check (and the device index DeepSpeed wants), nothing else."""
    environment(rank, world)
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    from gradaccum.lightning import ExactAccumulation

    class CPUDeepSpeed(DeepSpeedStrategy):
        def setup_environment(self):
            DDPStrategy.setup_environment(self)

        @property
        def root_device(self):
            return torch.device("cpu", 0)

        def setup_distributed(self):
            self.set_world_ranks()
            self._init_deepspeed_distributed()

    class Module(pl.LightningModule):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def training_step(self, seqs, batch_idx):
            loss, n = lm_mean_loss(self.net, seqs)
            return {"loss": loss, "num_items": n} if exact else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LR)

    torch.manual_seed(0)
    module = Module(TinyLM())
    before = [p.detach().double().clone() for p in module.net.parameters()]
    data = micro_batches([3, 5, 2, 4, 6, 1, 3, 4], seed=5)
    strategy = CPUDeepSpeed(stage=stage, config={"zero_allow_untested_optimizer": True,
                                                 "train_micro_batch_size_per_gpu": 1})
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, max_epochs=1, accumulate_grad_batches=4,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[ExactAccumulation()] if exact else [])
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    return {"before": before, "after": full_weights(trainer.strategy.deepspeed_engine), "data": data}
