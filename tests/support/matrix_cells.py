"""One cell of the composition matrix: a feature, run in one process or on each rank.

Every cell trains a small per-token language model (with an embedding, so that compact rows
apply, and an injectable out-of-memory layer) through the public API, records the gradient
handed to the optimizer at every update, and returns it beside the weights each window
started from. The test compares those with the float64 big batch over all ranks' data.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradaccum
from support.reference import VOCAB, OOMAbove, RecordingSGD, micro_batches, pad

PRECISIONS = ["fp32", "bf16", "fp16", "bf16-params"]
# "terms*": the same feature with a two-term loss (a token mean plus a sequence mean over the
# long sequences only, absent from some micro-batches), weighed per term (docs/terms.md).
FEATURES = ["counts", "oom_forward", "oom_backward", "resume", "compact", "clip", "partial", "uneven",
            "terms", "terms_oom_forward", "terms_resume", "terms_clip", "terms_partial", "terms_uneven"]
K = 3
CLIP = 0.05
LONG = 12  # a sequence with at least this many predicted tokens enters the sequence term
SEQ_COEF = 0.3


def base(feature: str) -> str:
    """The feature without its loss: "terms_clip" -> "clip", "terms" -> "counts"."""
    return "counts" if feature == "terms" else feature.removeprefix("terms_")


def _long(batch):
    return batch["mask"][:, 1:].sum(1) >= LONG


# Each term's counter: the items it averages over in a micro-batch, counted before the window.
COUNTERS = {"lm": lambda b: int(b["mask"][:, 1:].sum()), "seq": lambda b: int(_long(b).sum())}


def term_losses(model, batch):
    """{"lm": (token mean, tokens as a tensor), "seq": (0.3 * mean over long sequences of their
    token means, long sequences)}; "seq" is left out where the micro-batch has none."""
    ids, mask = batch["ids"], batch["mask"]
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].float()
    ce = ce.reshape(valid.shape) * valid
    out = {"lm": (ce.sum() / valid.sum(), valid.sum())}
    long = _long(batch)
    if int(long.sum()):
        per_seq = ce.sum(1) / valid.sum(1).clamp(min=1)
        out["seq"] = (SEQ_COEF * per_seq[long].mean(), int(long.sum()))
    return out


class CellLM(torch.nn.Module):
    def __init__(self, dim: int = 16):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.oom = OOMAbove()
        self.proj = torch.nn.Linear(dim, dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(self, ids):
        return self.head(torch.tanh(self.proj(self.oom(self.emb(ids)))))


def batch_of(seqs):
    ids, mask = pad(seqs)
    return {"ids": ids, "mask": mask}


def mean_loss(model, batch):
    """Mean next-token loss over the valid positions, and their number."""
    ids, mask = batch["ids"], batch["mask"]
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].reshape(-1)
    return (ce * valid).sum() / valid.sum(), int(valid.sum())


def rank_data(feature: str, rank: int, world: int) -> list[dict]:
    """This rank's micro-batches: uneven sizes and lengths; ranks differ."""
    if feature == "uneven":
        sizes = [[3, 1, 4, 2, 2, 1, 3], [2, 4, 1, 3, 2]][rank % 2] if world > 1 else [3, 1, 4, 2, 2, 1, 3]
    elif feature == "partial":
        sizes = [[3, 1, 4, 2, 2], [2, 4, 1, 3, 2]][rank % 2]
    else:
        sizes = [[3, 1, 4, 2, 5, 1], [2, 4, 1, 3, 2, 2]][rank % 2]
    return [batch_of(mb) for mb in micro_batches(sizes, seed=100 + rank)]


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _wrap(net, wrap):
    if wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(net)
    if wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        return fully_shard(net)
    return net


def _deepspeed(net, precision):
    """``deepspeed.initialize`` with plain SGD; DeepSpeed's bf16 section for "bf16" (the
    Accumulator then stays fp32: DeepSpeed casts the model itself)."""
    import deepspeed

    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    engine, opt, _, _ = deepspeed.initialize(model=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
                                             config=config)
    return engine, opt


def _weights(model) -> list[torch.Tensor]:
    """The full fp32 weights: DeepSpeed's fp32 master copy where it keeps one."""
    if type(model).__name__ != "DeepSpeedEngine":
        return [_full(p.detach()).float().clone() for p in model.parameters()]
    from deepspeed.utils import safe_get_full_fp32_param

    return [(safe_get_full_fp32_param(p) if safe_get_full_fp32_param(p) is not None else p).detach().float().clone()
            for p in model.module.parameters()]


def run_cell(rank: int, world: int, wrap: str, precision: str, feature: str, sync_every: bool = False) -> dict:
    """Train the cell; return the gradients seen per update and the weights before each.

    Under DeepSpeed (``wrap="zero2"``) the gradient lives in DeepSpeed's partitions: what the
    update applied is read back from the weights, (before - after) / lr, SGD being linear."""
    torch.manual_seed(0)
    net = CellLM()
    if precision == "bf16-params":
        net = net.to(torch.bfloat16)
    terms, feature = feature.startswith("terms"), base(feature)
    if feature.startswith("oom"):
        net.oom.limit, net.oom.where = 2, feature.split("_")[1]
    init = copy.deepcopy(net.state_dict())
    deepspeed = wrap == "zero2"
    if deepspeed:
        model, opt = _deepspeed(net, precision)
        precision = "fp32" if precision == "bf16" else precision
    else:
        model = _wrap(net, wrap)
        opt = RecordingSGD(model.parameters(), lr=0.5)
    kw = {
        "precision": precision if precision != "bf16-params" else "fp32",
        "accum_dtype": torch.float32 if precision == "bf16-params" else None,
        "compact_embedding_grads": feature == "compact",
        "max_grad_norm": CLIP if feature == "clip" else None,
        "sync_every_micro_batch": sync_every,
        "terms": COUNTERS if terms else None,
    }

    def loss_of(b):
        return term_losses(model, b) if terms else mean_loss(model, b)

    def backward(window, b):
        with window.autocast():
            out = loss_of(b)
        window.backward(out) if terms else window.backward(out[0], num_items=out[1])
    try:
        acc = gradaccum.Accumulator(model, opt, steps=K, **kw)
    except ValueError as exc:
        return {"refused": str(exc)}
    data = rank_data(feature, rank, world)
    before, reports, windows = [], [], []
    acc_now = acc
    stop_after = 2 if feature == "resume" else None
    for window in acc.windows(data):
        before.append(_weights(model))
        for i, batch in enumerate(window):
            if feature.startswith("oom"):
                window.forward_backward(batch, loss_of)
            else:
                backward(window, batch)
            if feature == "resume" and len(reports) == 1 and i + 1 == stop_after:
                break
        if feature == "resume" and len(reports) == 1:
            break  # leave the second window open, to be saved mid-way
        reports.append(window.step())
    if feature == "resume":
        # A fresh accumulator (and optimizer) from the saved state finishes the window.
        saved = copy.deepcopy(acc.state_dict())
        opt2 = RecordingSGD(model.parameters(), lr=0.5)
        opt2.seen = opt.seen
        for p in model.parameters():
            p.grad = None
        acc_now = gradaccum.Accumulator(model, opt2, steps=K, **kw)
        acc_now.load_state_dict(saved)
        rest = data[K + stop_after:]
        for window in acc_now.windows(rest):
            if len(before) < len(reports) + 1:
                before.append([_full(p.detach()).float().clone() for p in model.parameters()])
            for batch in window:
                backward(window, batch)
            reports.append(window.step())
        opt = opt2
    splits = sum(r.splits for r in reports)
    if deepspeed:
        after = before[1:] + [_weights(model)]
        seen = [[(b - a) / 0.5 for b, a in zip(w0, w1)] for w0, w1 in zip(before, after)]
    else:
        seen = [[_full(g).float() for g in step] for step in opt.seen]
    return {"init": init, "before": before, "reports": reports, "splits": splits, "seen": seen}


def ddp_or_fsdp_cells(rank: int, world: int, wrap: str, precision: str, features: list[str],
                      sync_every: bool = False) -> dict:
    """Every feature in turn on this rank (a spawned process)."""
    if wrap == "zero2":
        import os

        os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="29613")
    out = {}
    for feature in features:
        try:
            out[feature] = run_cell(rank, world, wrap, precision, feature, sync_every)
        except Exception as exc:  # reported to the test, which names the cell
            import traceback

            out[feature] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        dist.barrier()
    return out


def every_precision(rank: int, world: int, wrap: str, precisions: list[str], features: list[str]) -> dict:
    """``ddp_or_fsdp_cells`` for each precision in turn, in one launch: ``{precision: cells}``."""
    return {precision: ddp_or_fsdp_cells(rank, world, wrap, precision, features) for precision in precisions}


def reference(result: dict, feature: str, world: int) -> list[list[torch.Tensor]]:
    """The float64 big-batch gradient of every window, over all ranks' micro-batches."""
    terms, feature = feature.startswith("terms"), base(feature)
    per_rank = [rank_data(feature, r, world) for r in range(world)]
    n_windows = len(result["seen"])
    wants = []
    for w in range(n_windows):
        model = CellLM().double()
        model.load_state_dict({k: v.double() for k, v in result["init"].items()})
        with torch.no_grad():
            for p, v in zip(model.parameters(), result["before"][w]):
                p.copy_(v.double())
        batches = [b for data in per_rank for b in data[w * K:(w + 1) * K]]
        total = sum(mean_loss_terms(model, b)[0] for b in batches)
        count = sum(mean_loss_terms(model, b)[1] for b in batches)
        loss = total / count
        if terms:  # plus 0.3 * the mean over every long sequence in the window of its token mean
            per_seq = torch.cat([sequence_means(model, b) for b in batches])
            loss = loss + SEQ_COEF * per_seq.mean()
        loss.backward()
        want = [p.grad.clone() for p in model.parameters()]
        if feature == "clip":
            norm = sum(float(g.pow(2).sum()) for g in want) ** 0.5
            want = [g * min(1.0, CLIP / (norm + 1e-6)) for g in want]
        wants.append(want)
    return wants


def mean_loss_terms(model, batch):
    ids, mask = batch["ids"], batch["mask"]
    logits = model(ids)[:, :-1]
    ce = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].reshape(-1).double()
    return (ce * valid).sum(), valid.sum()


def sequence_means(model, batch):
    """Token means of the batch's long sequences, each sequence on its own (float64)."""
    out = []
    for ids, mask in zip(batch["ids"], batch["mask"]):
        n = int(mask[1:].sum())
        if n >= LONG:
            x = ids[: n + 1].unsqueeze(0)
            out.append(F.cross_entropy(model(x)[0, :-1], x[0, 1:]).reshape(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)
