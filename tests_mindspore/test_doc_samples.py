"""The MindSpore blocks of README.md and docs/mindspore.md run as written, in one process;
the data-parallel one runs inside the msrun workers of test_graph (``dp_worker.py``)."""

from __future__ import annotations

import pytest

from doc_samples import harness, mindspore_blocks, run


def test_the_blocks_are_found():
    found = mindspore_blocks()
    assert len(found["README.md"]) == 2 and len(found["docs/mindspore.md"]) == 5


@pytest.mark.parametrize("page", ["README.md", "docs/mindspore.md"])
def test_the_pages_blocks_run_as_written(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints written by a block land here
    ns = harness()
    for i, code in enumerate(mindspore_blocks()[page]):
        if "init()" in code:
            continue  # the data-parallel block: run under msrun by dp_worker.py
        run(code, ns, str(tmp_path), f"block{i}")
    assert "accumulator" in ns or "acc" in ns
