"""Losses with several denominators: a training loop and its float64 big-batch reference.

The loss is the matrix cells' two terms (``matrix_cells.term_losses``): a token mean plus
0.3 x a mean over the long sequences of their token means. With lr = 0 every window starts
from the same weights, so each window's recorded gradient is compared with the big batch of
that window's micro-batches (all ranks) at the initial weights.
"""

from __future__ import annotations

import copy

import torch

import gradaccum
from support import matrix_cells as mc
from support.reference import RecordingSGD, make_sequences


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return mc.CellLM()


def train(net: torch.nn.Module, loader, steps, loss=None, **kw) -> tuple[list, list]:
    """The gradient handed to the optimizer at each window, and the window reports."""
    opt = RecordingSGD(net.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(net, opt, steps=steps, terms=kw.pop("terms", mc.COUNTERS), **kw)
    loss = loss or (lambda window, b: window.backward(mc.term_losses(net, b)))
    reports = []
    for window in acc.windows(loader):
        for batch in window:
            loss(window, batch)
        reports.append(window.step())
    return [[g.float() for g in step] for step in opt.seen], reports


def reference(net: torch.nn.Module, window_batches: list[list[dict]]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The float64 gradient of the window's big-batch loss, and each term's value."""
    m = copy.deepcopy(net).double()
    tokens = [mc.mean_loss_terms(m, b) for b in window_batches]
    lm = sum(t[0] for t in tokens) / sum(t[1] for t in tokens)
    per_seq = torch.cat([mc.sequence_means(m, b) for b in window_batches])
    seq = mc.SEQ_COEF * per_seq.mean() if len(per_seq) else torch.zeros((), dtype=torch.float64)
    (lm + seq).backward()
    lm, seq = lm.detach(), seq.detach()
    return [p.grad.clone() for p in m.parameters()], {"lm": lm.item(), "seq": seq.item()}


def token_budget_batches(rank: int, world: int) -> tuple[list[dict], list[list[dict]]]:
    """This rank's micro-batches in loader order, and its windows, cut by a token budget."""
    from gradaccum.data import TokenBudgetSampler

    seqs = make_sequences(40, seed=21, lo=2, hi=30)
    sampler = TokenBudgetSampler([len(s) for s in seqs], window=8, max_tokens=70, seed=2, rank=rank,
                                 world_size=world)
    windows = [[mc.batch_of([seqs[i] for i in mb]) for mb in w] for w in sampler.windows()]
    return sampler, windows, seqs


def token_budget_two_ranks(rank: int, world: int) -> dict:
    """DDP over token-budget windows: ranks' windows differ in micro-batches (stand-ins)."""
    sampler, windows, seqs = token_budget_batches(rank, world)
    net = torch.nn.parallel.DistributedDataParallel(model())
    loader = torch.utils.data.DataLoader(seqs, batch_sampler=sampler, collate_fn=mc.batch_of)
    seen, reports = train(net, loader, sampler, loss=lambda w, b: w.backward(mc.term_losses(net, b)))
    return {"seen": seen, "stand_ins": [r.stand_ins for r in reports], "terms": [r.terms for r in reports]}


def stored_two_ranks_both(rank: int, world: int) -> dict:
    """``stored_two_ranks`` plain, then with out-of-memory splits, in one launch."""
    return {oom: stored_two_ranks(rank, world, oom) for oom in ("", "backward")}


def stored_two_ranks(rank: int, world: int, oom: str = "") -> dict:
    """DDP, several terms named without counters (one gradient store per term); ranks' data differ."""
    net = model()
    if oom:
        net.oom.limit, net.oom.where = 2, oom
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    data = mc.rank_data("counts", rank, world)
    if oom:
        loss = lambda w, b: w.forward_backward(b, lambda x: mc.term_losses(ddp, x))  # noqa: E731
    else:
        loss = lambda w, b: w.backward(mc.term_losses(ddp, b))  # noqa: E731
    seen, reports = train(ddp, data, 3, loss=loss, terms=["lm", "seq"])
    acc = gradaccum.Accumulator(ddp, torch.optim.SGD(ddp.parameters(), lr=0.0), steps=3)
    refused = ""
    for window in acc.windows(data[3:]):  # every rank's first micro-batch has both terms
        try:
            window.backward(mc.term_losses(ddp, next(iter(window))))
        except ValueError as exc:
            refused = str(exc)
        break
    return {"seen": seen, "terms": [r.terms for r in reports], "splits": [r.splits for r in reports],
            "refused": refused}
