"""How ``gradaccum train --shard`` lays the model over the ranks: one layout per mode.

``ddp`` keeps a whole model on every rank; ``fsdp2`` shards parameters, gradients and
optimizer state with ``fully_shard``; ``hsdp`` does so within groups of ranks and replicates
across them (a 2-D mesh, both dimensions data-parallel); ``zero1``/``zero2``/``zero3`` hand the model to
DeepSpeed. Each layout says how to wrap the model and build the optimizer, whether every rank
must join an evaluation (sharded weights are gathered inside the forward), and how a
checkpoint saves and restores what the ranks hold. The training loop is the same for all:
the engine picks its data-parallel adapter from the wrapped model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import torch



def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW without decay on biases and normalization weights (the usual transformer recipe).

    >>> adamw(torch.nn.Linear(2, 2), 1e-3, 0.01).param_groups[1]["weight_decay"]
    0.0
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr
    )


class Layout:
    """Whole weights on every rank (DDP, or one process): rank 0 saves them and the optimizer."""

    name = "ddp"
    evaluate_everywhere = False  # rank 0 alone can run a forward
    precision_of_engine = False  # the Accumulator's precision is the run's
    sync_every_micro_batch = False  # one gradient reduction per window
    data_parallel: Any = None  # the ranks that see different micro-batches, when not the default group

    def wrap(self, core: torch.nn.Module, world: int, device: torch.device, lr: float, weight_decay: float,
             cfg: Any) -> tuple[torch.nn.Module, Any, torch.optim.Optimizer]:
        """(the model to train, the optimizer to give the Accumulator, the torch optimizer a
        scheduler steps)."""
        model = core
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)
        optimizer = adamw(model, lr, weight_decay)
        return model, optimizer, optimizer

    @property
    def compact(self) -> bool:
        """Whether the accumulator may hold embedding gradients as rows (only over plain or DDP models)."""
        return True

    def weights(self, core: torch.nn.Module) -> Optional[dict[str, torch.Tensor]]:
        """The whole weights for ``model.safetensors`` (None: save the module itself); every rank calls it."""
        return None

    def optimizer_state(self, optimizer: Any) -> Any:
        """What rank 0 saves of the optimizer; every rank calls it."""
        return optimizer.state_dict()

    def save_ranks(self, staging: Path) -> None:
        """Each rank's own share of the checkpoint, written into ``staging`` (every rank)."""

    def load(self, path: Path, core: torch.nn.Module, optimizer: Any, state: dict[str, Any],
             load_weights: Callable[[torch.nn.Module, Path], None]) -> None:
        """Restore weights and optimizer on every rank."""
        load_weights(core, path)
        optimizer.load_state_dict(state["optimizer"])


class FSDP2(Layout):
    """``fully_shard`` on each block of the encoder (or decoder), then the whole model.

    Checkpoints hold the full weights and optimizer state, gathered to rank 0 and sent back
    to every rank's shards on resume (``torch.distributed.checkpoint.state_dict``)."""

    name = "fsdp2"
    evaluate_everywhere = True

    def wrap(self, core, world, device, lr, weight_decay, cfg):
        from torch.distributed.fsdp import fully_shard

        mesh = self.mesh(world, device, cfg)
        for module in list(core.modules()):
            if isinstance(module, torch.nn.ModuleList):  # the transformer's blocks
                for block in module:
                    fully_shard(block, mesh=mesh)
        fully_shard(core, mesh=mesh)
        self._model = core
        optimizer = adamw(core, lr, weight_decay)
        return core, optimizer, optimizer

    def mesh(self, world: int, device: torch.device, cfg: Any) -> Any:
        """The device mesh to shard over (None: every rank, one dimension)."""
        return None

    @property
    def compact(self) -> bool:
        return False

    @staticmethod
    def _options(**kw: Any) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def weights(self, core):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(core, options=self._options())

    def optimizer_state(self, optimizer):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self._model, optimizer, options=self._options())

    def load(self, path, core, optimizer, state, load_weights):
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        rank0 = torch.distributed.get_rank() == 0
        weights = load_file(str(path / "model.safetensors")) if rank0 else {}
        set_model_state_dict(core, weights, options=self._options(broadcast_from_rank0=True))
        set_optimizer_state_dict(core, optimizer, state["optimizer"] if rank0 else {},
                                 options=self._options(broadcast_from_rank0=True))

    _model: torch.nn.Module


class HSDP(FSDP2):
    """``fully_shard`` over a ("replicate", "shard") mesh: each of ``--replicas`` groups of
    ranks holds one sharded copy, the gradient reduce-scattered within a group and all-reduced
    across them. Every rank sees its own micro-batches, so items are counted over the whole
    mesh (``data_parallel=mesh``). Checkpoints as ``fsdp2``."""

    name = "hsdp"

    def mesh(self, world, device, cfg):
        from torch.distributed.device_mesh import init_device_mesh

        replicas = hsdp_replicas(cfg.replicas, world, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
        self.data_parallel = init_device_mesh(device.type, (replicas, world // replicas),
                                              mesh_dim_names=("replicate", "shard"))
        return self.data_parallel


def hsdp_replicas(replicas: Optional[int], world: int, local_world: int) -> int:
    """How many sharded copies ``--shard hsdp`` makes: ``--replicas``, else one per node;
    refused, before any work, when it does not divide the ranks.

    >>> hsdp_replicas(None, world=16, local_world=8)
    2
    """
    from .config import ConfigError

    chosen = replicas if replicas is not None else max(1, world // max(1, local_world))
    if world % chosen:
        raise ConfigError(f"--replicas {chosen} does not divide the {world} ranks: --shard hsdp makes {chosen} "
                          f"groups of equal size; give --replicas a divisor of {world}")
    return chosen


class Zero(Layout):
    """DeepSpeed ZeRO stage 1, 2 or 3 over the model and AdamW; its checkpoints are DeepSpeed's
    own (every rank writes its partitions), inside the run's checkpoint directory.

    zero1 reduces the gradient once per window; zero2 reduce-scatters after every micro-batch
    so that its gradients stay sharded (chosen for memory, it would otherwise hold them whole
    like zero1); zero3 reduce-scatters per micro-batch by design."""

    evaluate_everywhere = False
    precision_of_engine = True  # bf16 is DeepSpeed's config section; the Accumulator stays fp32

    def __init__(self, stage: int):
        self.stage = stage
        self.name = f"zero{stage}"
        self.engine: Any = None
        self.sync_every_micro_batch = stage == 2

    @property
    def compact(self) -> bool:
        return False

    def wrap(self, core, world, device, lr, weight_decay, cfg):
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else device.type)
        import deepspeed

        torch_optimizer = adamw(core, lr, weight_decay)
        config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": self.stage}, "zero_allow_untested_optimizer": True,
            "gradient_clipping": cfg.max_grad_norm or 0.0, "steps_per_print": 10**9,
        }
        if cfg.precision == "bf16":
            config["bf16"] = {"enabled": True}
        self.engine, optimizer, _, _ = deepspeed.initialize(model=core, optimizer=torch_optimizer, config=config)
        self.evaluate_everywhere = self.stage == 3  # ZeRO-3 gathers weights inside each forward
        return self.engine, optimizer, torch_optimizer

    def weights(self, core):
        # Copies: DeepSpeed's parameters are views into its flat buffers (and ZeRO-3's are
        # gathered only inside this block), which safetensors will not save as they are.
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(core.parameters()), enabled=self.stage == 3):
            if torch.distributed.get_rank() != 0:
                return {}
            return {k: v.detach().clone() for k, v in core.state_dict().items()}

    def optimizer_state(self, optimizer):
        return None  # in DeepSpeed's own files (save_ranks)

    def save_ranks(self, staging):
        self.engine.save_checkpoint(str(staging), tag="deepspeed", save_latest=False)

    def load(self, path, core, optimizer, state, load_weights):
        loaded, _ = self.engine.load_checkpoint(str(path), tag="deepspeed", load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError("its DeepSpeed state is missing")


def layout(name: str) -> Layout:
    """The layout of ``--shard name``.

    >>> layout("zero2").name
    'zero2'
    """
    if name.startswith("zero"):
        return Zero(int(name[-1]))
    return {"fsdp2": FSDP2, "hsdp": HSDP}.get(name, Layout)()
