"""Real processes (2 CPU ranks, gloo): exact across ranks, one all-reduce per step, no hang."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from support import dist_workers
from support import launch
from support.reference import TinyLM, big_batch_lm_grads, make_sequences, micro_batches, rel_error  # noqa: F401

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "wrap,rank1_sizes,sync_every",
    [
        # DDP: rank 0 has 7 micro-batches (windows of 4 and 3), rank 1 has 6 (4 and 2).
        ("ddp", [2, 2, 5, 1, 1, 2], False),
        # FSDP2 gathers parameters in every forward: the short rank stands in at weight zero.
        ("fsdp2", [2, 2, 5, 1, 1, 2], False),
        ("fsdp2", [2, 2, 5, 1, 1, 2], True),  # reduce-scatter after every micro-batch
    ],
)
def test_exact_across_ranks_with_uneven_items_and_last_windows(tmp_path, wrap, rank1_sizes, sync_every):
    per_rank = [micro_batches([3, 1, 4, 2, 2, 1, 3], seed=1), micro_batches(rank1_sizes, seed=2)]
    results = dist_workers.spawn(dist_workers.exact_lm, 2, tmp_path, wrap, per_rank, 4, sync_every)
    for r in results:
        assert "error" not in r, r.get("trace")
    r0, r1 = results
    assert len(r0["seen"]) == 2
    windows = [(slice(0, 4), slice(0, 4)), (slice(4, 7), slice(4, len(rank1_sizes)))]
    for w, (s0, s1) in enumerate(windows):
        model = TinyLM()
        model.load_state_dict(r0["init"])
        with torch.no_grad():
            for p, value in zip(model.parameters(), r0["before"][w]):
                p.copy_(value)
        union = per_rank[0][s0] + per_rank[1][s1]  # the single-process big batch
        want = big_batch_lm_grads(model, union)
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5
        # Reports are global and the same on every rank.
        tokens = sum(len(s) - 1 for mb in union for s in mb)
        assert r0["reports"][w].num_items == r1["reports"][w].num_items == tokens
        assert r0["reports"][w].loss == pytest.approx(r1["reports"][w].loss, rel=1e-12)
        assert r0["reports"][w].micro_batches == len(union)
    if wrap == "ddp":
        # One gradient all-reduce per window (one bucket for this small model), not one per micro-batch.
        assert r0["calls"] == r1["calls"] == [1, 1]


@pytest.mark.multiprocess
def test_a_rank_with_an_extra_window_finishes_exactly(tmp_path):
    # Rank 0 has 3 windows, rank 1 has 2: in the third, rank 1 stands in at weight zero and
    # the update is rank 0's window alone, the same on both ranks; nobody waits.
    results = dist_workers.spawn(dist_workers.uneven_windows, 2, tmp_path, [3, 2])
    for r in results:
        assert r["message"] is None and r["steps"] == 3 and r["seconds"] < 20
    r0, r1 = results
    assert torch.equal(r0["weight"], r1["weight"])
    x, y, w0 = r0["last_window"]
    ref = torch.nn.Linear(3, 1).double()
    with torch.no_grad():
        ref.weight.copy_(w0[0]), ref.bias.copy_(w0[1])
    ref(x.double()).sub(y.double()).pow(2).mean().backward()
    for r in results:
        assert rel_error(r["last_grads"], [ref.weight.grad, ref.bias.grad]) < 1e-6


@pytest.mark.multiprocess
def test_a_rank_with_no_data_at_all_fails_fast_naming_it(tmp_path):
    results = dist_workers.spawn(dist_workers.uneven_windows, 2, tmp_path, [1, 0])
    for r in results:
        assert r["message"] is not None and "ranks [1] have no micro-batch at all" in r["message"]
        assert r["steps"] == 0 and r["seconds"] < 20


@pytest.mark.multiprocess
def test_transformers_trainer_under_torchrun_equals_one_process_big_batch(tmp_path):
    """2 ranks x micro-batch 2 x k=3 with uneven token counts per rank == batch 12 in one process."""
    transformers = pytest.importorskip("transformers")
    from support.hf import gpt2_lm, pad_collator, train, variable_length_rows

    weights = tmp_path / "rank0.pt"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "support.hf_trainer_worker", str(weights)],
        capture_output=True, text=True, env=launch.env(), timeout=300,
    )
    assert launch.finished(proc), proc.stderr[-3000:]
    data, collate = variable_length_rows(36, causal=True), pad_collator(causal=True)
    big = train(transformers.Trainer, gpt2_lm(), data, collate, tmp_path, batch=12, k=1, own_mean=True)
    got = torch.load(weights)
    diff = max(float((got[k] - v).abs().max()) for k, v in big.state_dict().items())
    assert diff < 1e-5, diff
