"""Sequence means under packing: a "mean over sequences of per-sequence token means" is
exact under packing + accumulation + data parallel, against the same sequences unpacked
(float64, each sequence on its own)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gradaccum
from gradaccum.data import sequence_ids, sequence_means
from support.reference import RecordingSGD, TinyLM, make_sequences, rel_error


def pack(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row and its position ids, restarting at 0 for each sequence."""
    return torch.cat(seqs), torch.cat([torch.arange(len(s)) for s in seqs])


def packed_seq_mean(model: torch.nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The micro-batch's mean over its sequences of each sequence's next-token mean, from
    the packed row: a prediction across two sequences is not counted."""
    seq = sequence_ids(position_ids=positions)
    logits = model(ids[None])[0, :-1]
    token = F.cross_entropy(logits, ids[1:], reduction="none")
    same = seq[1:] == seq[:-1]  # the next token belongs to the same sequence
    means, counted = sequence_means(token, seq[:-1], mask=same)
    return means[counted].mean(), int(counted.sum())


def unpacked_reference(model: torch.nn.Module, seqs: list[torch.Tensor]) -> list[torch.Tensor]:
    ref = copy.deepcopy(model).double()
    per_seq = [F.cross_entropy(ref(s[None])[0, :-1], s[1:]) for s in seqs if len(s) > 1]
    (sum(per_seq) / len(per_seq)).backward()
    return [p.grad.detach().clone() for p in ref.parameters()]


def windows_of(seed: int, sizes: list[int]) -> list[list[torch.Tensor]]:
    seqs = make_sequences(sum(sizes), seed=seed, lo=2, hi=20)
    out, i = [], 0
    for n in sizes:
        out.append(seqs[i:i + n])
        i += n
    out[0].insert(1, torch.tensor([7]))  # one token, no prediction: it is not a sequence of the mean
    return out


def test_sequence_ids_from_positions_and_cu_seqlens_agree():
    lengths = [3, 1, 5, 2]
    ids_pos = sequence_ids(position_ids=torch.cat([torch.arange(n) for n in lengths]))
    ids_cu = sequence_ids(cu_seqlens=torch.tensor([0, 3, 4, 9, 11]), length=11)
    assert torch.equal(ids_pos, ids_cu) and ids_pos.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0"):
        sequence_ids(cu_seqlens=torch.tensor([0, 5, 3]), length=3)


@pytest.mark.parametrize("steps", [1, 3])
def test_packed_sequence_means_accumulated_equal_the_unpacked_big_batch(steps):
    # Micro-batches pack 1 to 6 sequences of 1 to 20 tokens each: weighting each micro-batch
    # by its tokens, or each the same, would be off; by its sequences it is exact.
    micro = windows_of(3, [4, 1, 6, 2, 3, 5])
    torch.manual_seed(0)
    init = TinyLM()
    seen = accumulate(copy.deepcopy(init), micro, steps, by_tokens=False)
    for w, got in enumerate(seen):
        want = unpacked_reference(init, [s for mb in micro[w * steps:(w + 1) * steps] for s in mb])
        assert rel_error(got, want) < 1e-5
    if steps == 3:  # the control: weighing by tokens is the wrong denominator here
        wrong = accumulate(copy.deepcopy(init), micro, steps, by_tokens=True)
        want = unpacked_reference(init, [s for mb in micro[:3] for s in mb])
        assert rel_error(wrong[0], want) > 0.02


def accumulate(model: torch.nn.Module, micro: list, steps: int, by_tokens: bool) -> list:
    """The gradient handed to the optimizer at each window, micro-batches weighed by their
    sequences (or, the control, by their tokens)."""
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=steps)
    for window in acc.windows(micro):
        for seqs in window:
            loss, n = packed_seq_mean(model, *pack(seqs))
            window.backward(loss, num_items=sum(len(s) for s in seqs) if by_tokens else n)
        window.step()
    return opt.seen


def packed_ddp(rank, world):
    """Two DDP ranks, packed micro-batches of different numbers of sequences, k=2."""
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(TinyLM())
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=2)
    for window in acc.windows(windows_of(10 + rank, [[5, 1, 3, 2], [2, 4, 1]][rank])):
        for seqs in window:
            loss, n = packed_seq_mean(model, *pack(seqs))
            window.backward(loss, num_items=n)
        window.step()
    return {"seen": opt.seen}


@pytest.mark.multiprocess
def test_packed_sequence_means_across_ranks_equal_the_unpacked_big_batch(tmp_path):
    from support import dist_workers

    results = dist_workers.spawn(packed_ddp, 2, tmp_path)
    for r in results:
        assert "error" not in r, r.get("trace")
    torch.manual_seed(0)
    init = TinyLM()
    data = [windows_of(10, [5, 1, 3, 2]), windows_of(11, [2, 4, 1])]
    for w in range(2):
        seqs = [s for rank in data for mb in rank[2 * w:2 * w + 2] for s in mb]
        want = unpacked_reference(init, seqs)
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5


def test_sequence_ids_and_means_refuse_what_would_mix_or_lose_tokens():
    from gradaccum.data import sequence_ids, sequence_means

    with pytest.raises(ValueError, match="must start at 0"):
        sequence_ids(position_ids=torch.tensor([1, 2, 0, 1]))
    with pytest.raises(TypeError, match="fractional"):
        sequence_ids(cu_seqlens=torch.tensor([0.0, 2.5, 4.0]), length=4)
    with pytest.raises(ValueError, match="is empty"):
        sequence_ids(position_ids=torch.tensor([], dtype=torch.long))
    with pytest.raises(TypeError, match="integers"):
        sequence_ids(position_ids=torch.tensor([0.0, 1.0]))
    assert sequence_ids(position_ids=[0, 1, 0]).tolist() == [0, 0, 1]  # a list of ints is fine
    losses = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    ids = sequence_ids(position_ids=torch.tensor([[0, 1, 2], [0, 1, 0]]))
    with pytest.raises(ValueError, match="mask must have token_losses' shape"):
        sequence_means(losses, ids, mask=torch.ones(3, 2))  # as many entries, other rows: mixed
    with pytest.raises(ValueError, match=">= 0"):
        sequence_means(losses.reshape(-1), torch.tensor([-1, 0, 0, 1, 1, 2]))
    with pytest.raises(TypeError, match="floating tensor"):
        sequence_means([1.0, 2.0], torch.tensor([0, 0]))
