"""What several engine test files share: the one launch of 8 ranks that the 3-D layouts run in."""

from __future__ import annotations

import pytest

from support import dist_workers


def _three_dimensional(rank: int, world: int) -> dict:
    from support import model_parallel, pipeline

    return {"dp-cp-tp": model_parallel.run(rank, world, "3d"), "dp-pp-tp": pipeline.run_3d(rank, world)}


@pytest.fixture(scope="session")
def eight_ranks(tmp_path_factory) -> list[dict]:
    """Each rank's results of data x context x tensor (``model_parallel.run``) and data x
    pipeline x tensor (``pipeline.run_3d``), one after the other in one launch of 8 ranks:
    starting 8 processes costs more than either run."""
    results = dist_workers.spawn(_three_dimensional, 8, tmp_path_factory.mktemp("eight"))
    for r in results:
        assert "error" not in r, r.get("trace")
    return results
