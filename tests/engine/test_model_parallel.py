"""Tensor and context parallelism on 2-D device meshes (4 CPU ranks) and both together on a 3-D
one (8 ranks): counts summed over the data-parallel ranks only (tensor-parallel ranks see the
same tokens), the clip norm over the whole DTensor gradients, against the float64 big batch of
the unsplit model and sequences."""

from __future__ import annotations

import pytest

from support import dist_workers
from support import model_parallel as mp
from support.reference import rel_error

pytestmark = pytest.mark.multiprocess


def _windows(groups: int = 2):
    data = [mp.data(g) for g in range(groups)]
    return [[b for d in data for b in d[0:3]], [b for d in data for b in d[3:6]]]


def _clipped(grads, max_norm=0.05):
    norm = sum(float(g.pow(2).sum()) for g in grads) ** 0.5
    return [g * min(1.0, max_norm / (norm + 1e-6)) for g in grads], norm


@pytest.mark.parametrize("layout,world", [("tp", 4), ("cp", 4), ("3d", 8), ("hsdp", 4)])
def test_meshes_of_two_and_three_dimensions_equal_the_float64_big_batch(request, tmp_path, layout, world):
    if layout == "3d":  # in the launch of 8 ranks the 3-D layouts share
        results = [r["dp-cp-tp"] for r in request.getfixturevalue("eight_ranks")]
    else:
        results = dist_workers.spawn(mp.run, world, tmp_path, layout)
    assert len(results) == world
    for r in results:
        assert "error" not in r, r.get("trace")
    windows = _windows(4 if layout == "hsdp" else 2)
    wants = mp.reference(windows)
    tokens = [float(sum(b["mask"][:, 1:].sum() for b in w)) for w in windows]
    for r in results:
        for w, (got, want) in enumerate(zip(r["seen"], wants)):
            clipped, norm = _clipped(want)
            assert rel_error(got, clipped) < 1e-5, (layout, w, rel_error(got, clipped))
            assert r["norms"][w] == pytest.approx(norm, rel=1e-5)  # the norm of the whole gradient
        # Summed over the data-parallel ranks only: tensor-parallel ranks would count each token twice.
        assert r["num_items"] == tokens
        if layout == "tp":  # without data_parallel=, a 2-D mesh is refused, naming what to pass
            assert r["refused"] and "('dp', 'tp')" in r["refused"] and "data_parallel=mesh['dp']" in r["refused"]
        if layout == "hsdp":  # both dimensions data-parallel: refused without data_parallel=mesh too
            assert r["refused"] and "('replicate', 'shard')" in r["refused"] and "HSDP" in r["refused"]
        if layout == "3d":
            assert r["refused"] and "('dp_cp', 'tp')" in r["refused"] and "data_parallel=" in r["refused"]
