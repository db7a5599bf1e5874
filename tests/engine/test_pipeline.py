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


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_schedules_equal_the_float64_big_batch_and_stock_does_not(tmp_path, schedule):
    (tmp_path / "exact").mkdir()
    (tmp_path / "stock").mkdir()
    exact = dist_workers.spawn(pp.run, 4, tmp_path / "exact", schedule, True)
    for r in exact:
        assert "error" not in r, r.get("trace")
    errors = [rel_error(_gathered(exact, s), pp.reference(s)) for s in range(2)]
    assert max(errors) < 1e-5, errors
    if schedule == "gpipe":  # the stock schedule: the mean of per-micro-batch means, divided by 3
        stock = dist_workers.spawn(pp.run, 4, tmp_path / "stock", schedule, False)
        assert max(rel_error(_gathered(stock, s), pp.reference(s)) for s in range(2)) > 0.02
