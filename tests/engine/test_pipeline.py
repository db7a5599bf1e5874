"""Pipeline parallel (``torch.distributed.pipelining``, 2 stages x 2 replicas on 4 CPU ranks)
with ``gradaccum.pipeline.ExactLoss``: each step's gradient against the float64 big batch of
both replicas' sequences, the full model; the stock schedule (``scale_grads=True``) beside it."""

from __future__ import annotations

import pytest

from support import dist_workers
from support import pipeline as pp
from support.reference import rel_error

pytestmark = pytest.mark.multiprocess


def _gathered(results, step):
    """Both stages' gradients, in the full model's order (replica 0's: every replica has them)."""
    by_stage = {r["stage"]: r["seen"][step] for r in results}
    return by_stage[0] + by_stage[1]


def test_gpipe_and_1f1b_equal_the_float64_big_batch_and_stock_does_not(tmp_path):
    results = dist_workers.spawn(pp.runs, 4, tmp_path)
    for r in results:
        assert "error" not in r, r.get("trace")
    for schedule in ("gpipe", "1f1b"):
        runs = [r[schedule] for r in results]
        errors = [rel_error(_gathered(runs, s), pp.reference(s)) for s in range(2)]
        assert max(errors) < 1e-5, (schedule, errors)
    # The stock schedule: the mean of per-micro-batch means, divided by the 3 micro-batches.
    stock = [r["stock"] for r in results]
    assert max(rel_error(_gathered(stock, s), pp.reference(s)) for s in range(2)) > 0.02
