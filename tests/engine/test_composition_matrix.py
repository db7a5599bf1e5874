"""Every feature x {one process, DDP, FSDP2, DeepSpeed ZeRO-2} x precision: the big batch, or refused up front.

The reference for each window is the float64 big batch over every rank's micro-batches of
that window, from the weights the window started from. A refusal must come from the
constructor (``ValueError``), before any work; a cell that errors later, hangs (the spawn
has a deadline) or is silently off fails.
"""

from __future__ import annotations

import pytest
import torch

from support import dist_workers
from support import matrix_cells as mc
from support.reference import rel_error
from support import launch

TOLERANCE = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3, "bf16-params": 3e-2}

# The cells the engine refuses, and why (checked: the message must say so).
REFUSED = {
    ("fsdp2", "bf16-params"): "MixedPrecisionPolicy",
    # DeepSpeed ZeRO-2: bf16 is its config's bf16 section (the "bf16" cell); these are refused.
    ("zero2", "fp16"): "DeepSpeed casts the model itself",
    ("zero2", "bf16-params"): "grad_accum_dtype",
}
REFUSED_FEATURE = {("fsdp2", "compact"): "compact_embedding_grads with an FSDP2",
                   ("zero2", "compact"): "compact_embedding_grads with a DeepSpeed engine"}
# FSDP2 cannot undo a failed attempt: its OOM cells are in test_fsdp2_oom_stops_every_rank;
# its mid-window state_dict needs sync_every_micro_batch (test_fsdp2_mid_window_state...).
# DeepSpeed likewise stops every rank on an OOM (as FSDP2), and refuses a mid-window
# state_dict under ZeRO (tests/integrations/test_deepspeed.py checks the refusal and boundary resume).
SEPARATE = {("fsdp2", "oom_forward"), ("fsdp2", "oom_backward"), ("fsdp2", "resume"),
            ("zero2", "oom_forward"), ("zero2", "oom_backward"), ("zero2", "resume")}


def check(result: dict, feature: str, precision: str, world: int, where: str, tolerance: float = 0.0) -> None:
    assert "error" not in result, f"{where}: {result.get('trace')}"
    wants = mc.reference(result, feature, world)
    expected_windows = {"partial": 2, "uneven": 3, "resume": 2}.get(mc.base(feature), 2)
    if world == 1 and mc.base(feature) == "uneven":
        expected_windows = 3
    assert len(result["seen"]) == expected_windows, where
    for w, (got, want) in enumerate(zip(result["seen"], wants)):
        err = rel_error(got, want)
        assert err < max(TOLERANCE[precision], tolerance), f"{where} window {w}: relative error {err:.3g}"
    if mc.base(feature).startswith("oom"):
        assert result["splits"] >= 1, f"{where}: no out-of-memory error was injected"


@pytest.mark.parametrize("precision", mc.PRECISIONS)
@pytest.mark.parametrize("feature", mc.FEATURES)
def test_one_process(feature, precision):
    result = mc.run_cell(0, 1, "none", precision, feature)
    check(result, feature, precision, 1, f"one process/{precision}/{feature}")


def _wraps():
    import importlib.util

    deepspeed = importlib.util.find_spec("deepspeed") is not None
    return ["ddp", "fsdp2", pytest.param("zero2", marks=pytest.mark.skipif(not deepspeed, reason="no deepspeed"))]


@pytest.fixture(scope="module")
def two_rank_launch(tmp_path_factory):
    """Every precision's cells of one wrap, run in one launch that the first test of the wrap
    starts and the others read: a launch costs more than a cell."""
    launched: dict = {}

    def launch(wrap: str) -> tuple[list[str], list[dict]]:
        features = [f for f in mc.FEATURES if (wrap, mc.base(f)) not in SEPARATE]
        if wrap not in launched:
            launched[wrap] = dist_workers.spawn(mc.every_precision, 2, tmp_path_factory.mktemp(wrap), wrap,
                                                mc.PRECISIONS, features)
        for r in launched[wrap]:
            assert "error" not in r, r.get("trace")
        return features, launched[wrap]

    return launch


@pytest.mark.multiprocess
@pytest.mark.parametrize("precision", mc.PRECISIONS)
@pytest.mark.parametrize("wrap", _wraps())
def test_two_ranks(two_rank_launch, wrap, precision):
    features, launched = two_rank_launch(wrap)
    results = [r[precision] for r in launched]
    refusal = REFUSED.get((wrap, precision))
    for feature in features:
        where = f"{wrap}/{precision}/{feature}"
        r0, r1 = results[0][feature], results[1][feature]
        expect = [m for m in (refusal, REFUSED_FEATURE.get((wrap, mc.base(feature)))) if m]
        if expect:
            assert "refused" in r0 and any(m in r0["refused"] for m in expect), f"{where}: {r0}"
            continue
        for r in (r0, r1):
            # DeepSpeed's update is read back from fp32 weights, (before - after) / lr: 1e-4.
            check(r, feature, precision, 2, where, 1e-4 if wrap == "zero2" else 0.0)
        # Every rank was handed the same update.
        for a, b in zip(r0["seen"], r1["seen"]):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), where


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_fsdp2_oom_stops_every_rank_with_the_same_error(tmp_path, where):
    # FSDP2 gathers and reduces inside forward and backward: a failed attempt cannot be
    # undone on one rank. The failing rank raises; the others, blocked in a collective it
    # will never join, stop with its message (exit 75) instead of hanging.
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    t0 = time.time()
    for rank in range(2):
        env = launch.env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                         LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "support.fsdp2_oom_worker", where], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    seconds = time.time() - t0
    assert seconds < 60, f"took {seconds:.0f} s"
    err0, err1 = outs[0][1], outs[1][1]
    assert procs[0].returncode == 3 and "caught: out of memory on rank 0" in err0, err0[-2000:]
    assert procs[1].returncode == 75, err1[-2000:]
    assert "rank 1 stops: out of memory on rank 0" in err1 and "smaller micro-batch" in err1


@pytest.mark.multiprocess
def test_fsdp2_mid_window_state(tmp_path):
    # Deferred sync: FSDP2 holds the partial gradients itself, so a mid-window state_dict is
    # refused with the way out; with sync_every_micro_batch the gradients are sharded .grad
    # and the resumed window equals the big batch.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = dist_workers.spawn(mc.ddp_or_fsdp_cells, 2, tmp_path / "a", "fsdp2", "fp32", ["resume"])
    for r in results:
        assert "sync_every_micro_batch=True" in r["resume"]["error"], r["resume"]
    results = dist_workers.spawn(mc.ddp_or_fsdp_cells, 2, tmp_path / "b", "fsdp2", "fp32", ["resume", "terms_resume"], True)
    for r in results:
        for feature in ("resume", "terms_resume"):
            check(r[feature], feature, "fp32", 2, f"fsdp2/fp32/{feature} (sync every micro-batch)")


@pytest.mark.multiprocess
def test_fsdp2_oom_under_torchrun_restarts_with_the_smaller_split_and_ends_at_the_big_batch(tmp_path):
    # Rank 0 runs out of memory in window 2; every rank stops, torchrun restarts both
    # (--max-restarts 1), they load the checkpoint of window 1, split as the error said,
    # and finish with the weights of plain SGD on each window's float64 big batch.
    import subprocess
    import sys

    from support.reference import rel_error

    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--max-restarts", "1", "--monitor-interval", "0.5", "-m", "support.fsdp2_restart_worker", str(tmp_path)],
        capture_output=True, text=True, env=launch.env(), timeout=240,
    )
    assert launch.finished(proc), proc.stderr[-3000:]
    assert "out of memory on rank 0" in proc.stderr
    final = torch.load(tmp_path / "final.pt", weights_only=False)
    assert final["attempt"] == 1 and final["parts"] == 2 and final["steps"] == 2
    per_rank = [mc.rank_data("counts", r, 2) for r in range(2)]
    torch.manual_seed(0)
    model = mc.CellLM().double()
    for w in range(2):
        batches = [b for data in per_rank for b in data[w * mc.K:(w + 1) * mc.K]]
        model.zero_grad()
        terms = [mc.mean_loss_terms(model, b) for b in batches]
        (sum(t[0] for t in terms) / sum(t[1] for t in terms)).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.5 * p.grad
    want = [p.detach() for p in model.parameters()]
    got = [final["weights"][name] for name, _ in model.named_parameters()]
    assert rel_error(got, want) < 1e-5
