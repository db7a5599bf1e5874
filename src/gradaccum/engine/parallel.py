"""Data-parallel adapters, chosen once from the model: one process, DDP, FSDP2 or DeepSpeed.

Each says how many ranks average the gradient, how to run a micro-batch without gradient
sync (public APIs only: DDP's ``no_sync()``, FSDP2's ``set_requires_gradient_sync()``, both
entered before the forward, where DDP decides whether the backward all-reduces), how to sum
a window's counters over ranks, how a backward runs, how the window's boundary scale reaches
the gradient and how the update is made, and what an out-of-memory error may do. The
one-process adapter does nothing at all. DeepSpeed's lives in ``engine/deepspeed.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import Any, ContextManager, Optional, Union

import torch
import torch.distributed as dist

Values = Union[list, torch.Tensor]


class SingleProcess:
    """No other ranks: nothing to skip, sum or announce.

    >>> SingleProcess().all_sum([3.0, 1.5])
    [3.0, 1.5]
    """

    world = 1
    rank = 0
    name = "one process"
    can_roll_back_oom = True  # a failed attempt's gradients are all in places the store sees
    can_encode = True  # window.encode(): the re-encoding pass can run without sync
    owns_gradients = False  # the gradient is in .grad, where the stores hold and scale it
    # Several terms without counters: extra terms differentiated apart (autograd.grad), which
    # needs the parameters' gradients to be whole tensors that no hook reduces behind our back.
    can_store_terms = True
    # Where a mid-window state_dict cannot reach the partial gradients, the reason why.
    holds_window_grads: Optional[str] = None
    # DDP's reducer all-reduces .grad inside the window's last backward: gradients the stores
    # hold elsewhere (fp32 buffers, compact rows) would miss it, so the engine reduces them.
    reduces_in_backward = False

    @staticmethod
    def wraps(model: Any) -> bool:
        """Whether this adapter is the one for ``model`` (see :func:`adapter_for`)."""
        return True

    def prepare(self, optimizer: Any, precision: str, accum_dtype: Any, compact: bool, scheduler: Any,
                max_grad_norm: Optional[float], sync_every_micro_batch: bool) -> tuple[Any, list[torch.Tensor], Any]:
        """Refuse what cannot hold here; return the optimizer to use, its parameters and the
        clip norm the accumulator applies itself (None where the engine clips)."""
        return optimizer, [p for group in optimizer.param_groups for p in group["params"]], max_grad_norm

    def controls_sync(self, sync_every_micro_batch: bool) -> bool:
        """Whether non-final micro-batches run inside :meth:`skip_sync`."""
        return False

    def skip_sync(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, weight: Any) -> None:
        """Backpropagate ``loss * weight`` (``weight``: a float, or a seed tensor like ``loss``)."""
        if isinstance(weight, torch.Tensor) and type(loss) is torch.Tensor:
            # Seeding backward with the weight is d(loss * weight)/d(loss) without a multiply
            # node in the graph or the ones_like that a bare backward() makes.
            loss.backward(weight)
        else:  # a tensor subclass (DTensor) wants its own kind of seed
            (loss * weight).backward()

    def begin_window(self) -> None:
        pass

    def finalize(self, stores: Any, scale: Any) -> Optional[list[torch.Tensor]]:
        """Apply the boundary scale; the gradients now in ``.grad``, or None when the engine
        keeps them (then it measures and clips them in :meth:`update`)."""
        return stores.finalize(scale)

    def update(self, optimizer: Any) -> Optional[tuple[float, bool]]:
        """The optimizer step; ``(norm, applied)`` when only the update could measure it."""
        optimizer.step()
        return None

    def abandon(self) -> None:
        pass

    def all_sum(self, values: Values) -> Values:
        return values

    def reduce_grads(self, grads: list[torch.Tensor]) -> None:
        pass

    def announce_oom(self, message: str) -> None:
        pass

    def watch_for_oom(self) -> None:
        pass


def sum_over(t: torch.Tensor, group: Any) -> torch.Tensor:
    """A copy of ``t`` summed over ``group``'s ranks, on the device its backend reduces on.

    Example:
        >>> sum_over(torch.tensor([3.0], dtype=torch.float64), group)  # doctest: +SKIP
        tensor([6.], dtype=torch.float64)
    """
    # gloo has no float64 reduction on CUDA tensors; NCCL has no CPU tensors.
    nccl = dist.get_backend(group) == "nccl"
    if not nccl and t.device.type != "cpu":
        t = t.cpu()
    elif nccl and t.device.type == "cpu":
        t = t.to(torch.device("cuda", torch.cuda.current_device()))
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


class _Ranks(SingleProcess):
    def __init__(self, model: torch.nn.Module, group: Any = None):
        self.model = model
        # The data-parallel ranks: the ones that see different micro-batches and average the
        # gradient. Model-parallel ranks (tensor, pipeline) see the same ones: never counted twice.
        self.group = group if group is not None else getattr(model, "process_group", None)
        self.world = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)

    def all_sum(self, values: Values) -> Values:
        """Sum over ranks in one small all-reduce (float64, so counts stay exact)."""
        if self.world == 1:  # a group of one (a DDP model on one rank): nothing to sum with
            return values
        on_device = isinstance(values, torch.Tensor)
        t = values if isinstance(values, torch.Tensor) else torch.tensor([float(v) for v in values], dtype=torch.float64)
        t = sum_over(t, self.group)
        return t if on_device else t.tolist()


class DDP(_Ranks):
    """``DistributedDataParallel``: its reducer all-reduces in the window's last backward,
    unless the engine reduces the window's gradient itself at the step (``reduce_grads``),
    which it does when a micro-batch may be retried or gradients are held elsewhere."""

    name = "DDP"
    reduces_in_backward = True

    @staticmethod
    def wraps(model: Any) -> bool:
        return hasattr(model, "no_sync")

    def controls_sync(self, sync_every_micro_batch: bool) -> bool:
        return not sync_every_micro_batch

    def skip_sync(self) -> ContextManager[None]:
        return self.model.no_sync()  # type: ignore[operator,return-value]

    def reduce_grads(self, grads: list[torch.Tensor]) -> None:
        """Average ``grads`` over ranks in one flat all-reduce per dtype, as DDP would."""
        if self.world == 1:
            return
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        for group in groups.values():
            flat = torch._utils._flatten_dense_tensors(group)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.world)
            for g, r in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                g.copy_(r)


class Collective(_Ranks):
    """Ranks whose forward or backward runs collectives (FSDP2's gathers, ZeRO's reductions):
    an attempt that fails part way leaves the other ranks waiting in a collective and cannot
    be undone, so an out-of-memory error stops every rank with the same message instead of
    retrying."""

    can_roll_back_oom = False
    can_store_terms = False
    # One key per torchrun attempt: a restarted run must not read the last attempt's news.
    KEY = f"gradaccum/out-of-memory/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    EXIT_CODE = 75  # EX_TEMPFAIL: restart (torchrun --max-restarts) with a smaller micro-batch

    def __init__(self, model: torch.nn.Module, group: Any = None):
        super().__init__(model, group)
        self._watch: threading.Thread | None = None
        self._store = _default_store()
        self._announced = False  # this rank raised the error itself: its own watch stands down

    def watch_for_oom(self) -> None:
        """Start (once) a thread that stops this rank when another announces an OOM: this
        rank may be blocked in a collective the failed rank will never join."""
        if self._watch is not None or self._store is None:
            return
        store = self._store

        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                try:
                    if self._announced:
                        return
                    if store.check([self.KEY]):
                        message = store.get(self.KEY).decode(errors="replace")
                        print(f"gradaccum: rank {self.rank} stops: {message}", file=sys.stderr, flush=True)
                        os._exit(self.EXIT_CODE)
                except Exception:  # the store went away with the job: nothing to watch
                    return
                stop.wait(0.2)

        def join() -> None:
            # A daemon thread still inside the store's C++ call when the interpreter finalizes
            # is unwound there, and the process aborts ("terminate called without an active
            # exception"): end it before that, at exit.
            stop.set()
            if self._watch is not None:
                self._watch.join(timeout=10)

        self._watch = threading.Thread(target=watch, name="gradaccum-oom-watch", daemon=True)
        self._watch.start()
        atexit.register(join)

    def announce_oom(self, message: str) -> None:
        self._announced = True
        if self._store is not None:
            self._store.set(self.KEY, message)


class FSDP2(Collective):
    """``fully_shard``: it gathers and reduces inside every forward and backward, and holds
    the deferred unsharded gradients inside its own parameters."""

    name = "FSDP2"
    can_encode = False  # the re-encoding pass would need its own resharding plan

    @staticmethod
    def wraps(model: Any) -> bool:
        return hasattr(model, "set_requires_gradient_sync")

    def prepare(self, optimizer: Any, precision: str, accum_dtype: Any, compact: bool, scheduler: Any,
                max_grad_norm: Optional[float], sync_every_micro_batch: bool) -> tuple[Any, list[torch.Tensor], Any]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if accum_dtype is not None and any(p.is_floating_point() and torch.finfo(p.dtype).bits < torch.finfo(accum_dtype).bits
                                           for p in params):
            raise ValueError(
                "accum_dtype with an FSDP2 model: FSDP2 holds the deferred gradients itself; give "
                "fully_shard a MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) instead"
            )
        if compact:
            raise ValueError(
                "compact_embedding_grads with an FSDP2 model: FSDP2 holds the deferred unsharded gradients "
                "inside its parameters, where no rows can be taken out; it already frees them per layer"
            )
        if not sync_every_micro_batch:
            self.holds_window_grads = (
                "FSDP2 holds the partial window's unsharded gradients inside its own parameters, out of reach. "
                "Save at a window boundary (after window.step()), or build the Accumulator with sync_every_micro_batch=True"
            )
        return optimizer, params, max_grad_norm

    def controls_sync(self, sync_every_micro_batch: bool) -> bool:
        return not sync_every_micro_batch

    @contextlib.contextmanager
    def _no_sync(self):
        self.model.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)  # type: ignore[operator]

    def skip_sync(self) -> ContextManager[None]:
        return self._no_sync()


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no store behind this process group: nothing to announce through
        return None


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is what ``deepspeed.initialize`` returned (told without importing it).

    >>> is_deepspeed_engine(torch.nn.Linear(2, 2))
    False
    """
    return any(c.__module__.startswith("deepspeed.") and c.__name__ == "DeepSpeedEngine" for c in type(model).__mro__)


def data_parallel_group(model: torch.nn.Module, params: list[torch.Tensor], data_parallel: Any) -> Any:
    """The process group whose ranks see different micro-batches: ``data_parallel`` as given
    (a process group or a ``DeviceMesh``, several dimensions flattened), else the default one;
    refused when the parameters lie on a mesh of several dimensions and nothing says which
    are data-parallel (tensor-parallel ranks see the same tokens: counted once, not per rank).

    >>> data_parallel_group(torch.nn.Linear(2, 2), [], None) is None
    True
    """
    if data_parallel is not None:
        if hasattr(data_parallel, "get_group"):  # a DeviceMesh
            mesh = data_parallel._flatten() if data_parallel.ndim > 1 else data_parallel
            return mesh.get_group()
        return data_parallel
    meshes = {id(p.device_mesh): p.device_mesh for p in params if hasattr(p, "device_mesh")}
    several = [m for m in meshes.values() if m.ndim > 1]
    if several:
        names = several[0].mesh_dim_names or tuple(f"dim {i}" for i in range(several[0].ndim))
        raise ValueError(
            f"the model's parameters lie on a device mesh with dimensions {names}, and the Accumulator cannot tell "
            "which of them are data-parallel: ranks of a tensor-parallel dimension see the same tokens and must not "
            "be counted twice, ranks of a context-parallel one see parts of the same sequences and must. Pass "
            f"data_parallel=mesh[{names[0]!r}] (the data-parallel dimension), data_parallel=mesh[(\"dp\", \"cp\")] "
            "with context parallelism, or data_parallel=mesh (every dimension) for HSDP, FSDP2 replicating over "
            "one dimension and sharding over the other")
    return None


def adapter_for(model: torch.nn.Module, kinds: tuple[type[SingleProcess], ...] = (), group: Any = None) -> SingleProcess:
    """The adapter for ``model``: the first of ``kinds`` (then FSDP2, DDP) that wraps it, or
    one process. ``build`` passes ``engine.deepspeed.DeepSpeed`` first, which needs no
    process group of torch's to be set up by the caller.

    >>> adapter_for(torch.nn.Linear(2, 2)).name
    'one process'
    """
    for kind in kinds:
        if kind.wraps(model):
            return kind(model)  # type: ignore[call-arg]
    if not (dist.is_available() and dist.is_initialized()):
        return SingleProcess()
    for ranks in (FSDP2, DDP):
        if ranks.wraps(model):
            return ranks(model, group)
    return SingleProcess()
