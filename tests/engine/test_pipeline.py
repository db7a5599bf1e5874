"""Pipeline parallel on 4 CPU ranks (two pipeline ranks x two data-parallel replicas) with
``gradaccum.pipeline.ExactLoss``: each step's gradient against the float64 big batch of both
replicas' sequences through the whole model, the stock schedule beside it. The schedules of
``torch.distributed.pipelining`` (two stages, or four, two per rank) and DeepSpeed's
``PipelineEngine``; and a 2 x 2 x 2 mesh of data, pipeline and tensor parallel on 8 ranks."""

from __future__ import annotations

import importlib.util

import pytest

from support import dist_workers
from support import pipeline as pp
from support.reference import rel_error

pytestmark = pytest.mark.multiprocess


def _gathered(results, step):
    """Both stages' gradients, in the full model's order (replica 0's: every replica has them)."""
    by_stage = {r["stage"]: r["seen"][step] for r in results}
    return by_stage[0] + by_stage[1]


def _gathered_quarters(results, step):
    """The four stages' gradients from the ranks that hold them, in the full model's order."""
    by_stage = {}
    for r in results:
        by_stage.update(r["seen"][step])
    return [g for i in range(4) for g in by_stage[i]]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> list[dict]:
    """The schedules of torch.distributed.pipelining, then DeepSpeed's PipelineEngine, in one
    launch of 4 ranks (a launch costs more than the runs)."""
    results = dist_workers.spawn(pp.runs, 4, tmp_path_factory.mktemp("pipeline"), True)
    for r in results:
        assert "error" not in r, r.get("trace")
    return results


def test_every_schedule_equals_the_float64_big_batch_and_stock_does_not(four_ranks):
    results = four_ranks
    for schedule in ("gpipe", "1f1b"):
        runs = [r[schedule] for r in results]
        errors = [rel_error(_gathered(runs, s), pp.reference(s)[0]) for s in range(2)]
        assert max(errors) < 1e-5, (schedule, errors)
    # The stock schedule: the mean of per-micro-batch means, divided by the 3 micro-batches.
    stock = [r["stock"] for r in results]
    assert max(rel_error(_gathered(stock, s), pp.reference(s)[0]) for s in range(2)) > 0.02
    # Four stages, two per rank: interleaved, looped, zero-bubble and V-shaped schedules.
    for schedule in pp.MULTI_STAGE:
        runs = [r[schedule] for r in results]
        errors = [rel_error(_gathered_quarters(runs, s), pp.reference(s, rows=8)[0]) for s in range(2)]
        assert max(errors) < 1e-5, (schedule, errors)
    stock = [r["stock-interleaved"] for r in results]
    assert max(rel_error(_gathered_quarters(stock, s), pp.reference(s, rows=8)[0]) for s in range(2)) > 0.02


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the [deepspeed] extra is not installed")
def test_deepspeed_pipeline_engine_with_counted_windows(four_ranks):
    """``ExactLoss.windows`` counts each step's micro-batches before ``train_batch`` runs them
    and undoes the engine's division by its accumulation steps; stock, every micro-batch's
    mean is divided by 3."""
    results = [r["deepspeed"] for r in four_ranks]
    for s in range(2):
        want, loss = pp.reference(s)
        exact = [r["exact"] for r in results]
        assert rel_error(_gathered(exact, s), want) < 1e-5
        # The loss train_batch reports is the step's mean over every item of both replicas.
        assert all(r["loss"][s] == pytest.approx(loss, rel=1e-5) for r in exact)
        assert rel_error(_gathered([r["stock"] for r in results], s), want) > 0.02
    assert all("exact.windows(batches, engine)" in r["exact"]["refused"] for r in results)


def test_data_pipeline_and_tensor_parallel_on_a_three_dimensional_mesh(eight_ranks):
    """And ``clip_grad_norm_``: every stage clipped by the whole model's norm, tensor-parallel
    shards made whole; a stage clipped by its own part's norm would be off."""
    results = [r["dp-pp-tp"] for r in eight_ranks]
    for s in range(2):
        want = pp.reference(s)[0]
        norm = sum(float(g.pow(2).sum()) for g in want) ** 0.5
        clipped = [g * min(1.0, pp.MAX_NORM / (norm + 1e-6)) for g in want]
        for tp_rank in range(2):  # each tensor-parallel rank's copy of the full gradient
            mine = [r for rank, r in enumerate(results) if rank % 2 == tp_rank]
            assert rel_error(_gathered(mine, s), clipped) < 1e-5
        assert all(r["norms"][s] == pytest.approx(norm, rel=1e-5) for r in results)
