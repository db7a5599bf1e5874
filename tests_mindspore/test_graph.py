"""AccumulatorCell inside a compiled train step, against the float64 big batch in numpy.

Each test runs the whole step (forward, gradients, accumulation, update) under ``ms.jit``
and, where the rule is the same, op by op in PyNative; GRAPH_MODE is process-wide, so a
fresh interpreter reruns a selection under it. Data parallel runs under ``msrun``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest

from gradaccum.mindspore import AccumulatorCell

from reference import SIZES, Setup, initial_weights, micro_batches, reference_grad, rel_err, sgd, tensors

HERE = os.path.dirname(os.path.abspath(__file__))
GRAPH = ms.get_context("mode") == ms.GRAPH_MODE


class Steps:
    """The train step and the flush a MindSpore user writes, compiled or not."""

    def __init__(self, setup: Setup, cell: AccumulatorCell, compiled: bool = True) -> None:
        grad_fn = ms.value_and_grad(setup.loss_fn, None, setup.opt.parameters)

        def counted(ids, targets, mask, scale):
            loss, grads = grad_fn(ids, targets, mask)
            grads = tuple(g * scale for g in grads)  # scale = NaN poisons a micro-batch
            return loss, cell(grads, mask.sum(), loss)

        def uncounted(ids, targets, mask, scale):
            loss, grads = grad_fn(ids, targets, mask)
            return loss, cell(tuple(g * scale for g in grads), None, loss)

        def flush():
            return cell.flush()

        wrap = ms.jit if compiled else (lambda f: f)
        self.counted, self.uncounted, self.flush_fn = wrap(counted), wrap(uncounted), wrap(flush)

    def feed(self, batches, weighted=True, scales=None):
        step = self.counted if weighted else self.uncounted
        scales = scales or [1.0] * len(batches)
        return [bool(step(*tensors(b), ms.Tensor(s, ms.float32))[1]) for b, s in zip(batches, scales)]

    def flush(self) -> bool:
        return bool(self.flush_fn())


def window_grad(w, window, weighted):
    if weighted:
        return reference_grad(w, window)
    each = [reference_grad(w, [b]) for b in window]  # each micro-batch's own mean, then their mean
    return {k: sum(g[k] for g in each) / len(each) for k in w}


def delta_err(setup, w0, ref):
    return rel_err({k: setup.weights()[k] - w0[k] for k in w0}, {k: ref[k] - w0[k] for k in w0})


MODES = ["jit"] if GRAPH else ["jit", "pynative"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("steps", [1, 3, 4])
def test_windows_equal_the_big_batch(steps, weighted, mode):
    w0 = initial_weights()
    batches = micro_batches(SIZES)  # 7 uneven micro-batches: k = 3 and 4 end on a partial window
    s = Setup(w0)
    cell = AccumulatorCell(s.opt, steps=steps)
    run = Steps(s, cell, compiled=mode == "jit")
    stepped = run.feed(batches, weighted)
    flushed = run.flush()
    windows = [batches[i:i + steps] for i in range(0, len(batches), steps)]
    ref = dict(w0)
    for win in windows:
        ref = sgd(ref, window_grad(ref, win, weighted))
    assert stepped == [(i + 1) % steps == 0 for i in range(len(batches))]
    assert flushed == (len(batches) % steps != 0)
    assert cell.windows == len(windows) == int(s.opt.global_step.asnumpy().reshape(-1)[0])
    assert cell.micro_batches == 0 and cell.skipped == 0
    assert delta_err(s, w0, ref) < 1e-5
    if weighted:
        assert cell.last_items == sum(float(b[2].sum()) for b in windows[-1])


class _Identity(ms.nn.Cell):
    """A one-process reducer: the cell takes its data-parallel path, with nothing to sum."""

    def construct(self, x):
        return x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("reducer", [None, "identity"])
def test_flush_says_whether_it_updated(mode, reducer):
    s = Setup(initial_weights())
    cell = AccumulatorCell(s.opt, steps=3, reducer=_Identity() if reducer else None)
    run = Steps(s, cell, compiled=mode == "jit")
    assert run.feed(micro_batches(SIZES[:1])) == [False]
    assert run.flush() is True  # the partial window was applied
    assert cell.windows == 1 and int(s.opt.global_step.asnumpy().reshape(-1)[0]) == 1
    assert run.flush() is False  # nothing held: no update (under data parallel: an empty close)


def test_the_reference_can_fail():
    """The seeds' sum, and the mean of micro-batch means, are both far from the big batch."""
    w0 = initial_weights()
    batches = micro_batches(SIZES[:4])
    ref = reference_grad(w0, batches)
    assert rel_err(window_grad(w0, batches, weighted=False), ref) > 0.05
    assert rel_err({k: v * 4 for k, v in window_grad(w0, batches, weighted=False).items()}, ref) > 1.0


def test_clipping_applies_to_the_windows_gradient():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:3])
    g = reference_grad(w0, batches)
    norm = sum(float(np.sum(v ** 2)) for v in g.values()) ** 0.5
    s = Setup(w0)
    cell = AccumulatorCell(s.opt, steps=3, max_grad_norm=0.25 * norm)
    Steps(s, cell).feed(batches)
    assert delta_err(s, w0, sgd(w0, {k: v * 0.25 for k, v in g.items()})) < 1e-5
    assert cell.last_grad_norm == pytest.approx(norm, rel=1e-5)


def test_a_non_finite_window_is_skipped_and_training_goes_on():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:5])
    s = Setup(w0)
    cell = AccumulatorCell(s.opt, steps=2)
    run = Steps(s, cell)
    assert run.feed(batches[:2], scales=[float("nan"), 1.0]) == [False, True]  # closed, not stepped
    assert cell.skipped == 1 and cell.windows == 1
    assert all(np.array_equal(s.weights()[k], w0[k].astype(np.float32)) for k in w0)
    assert run.feed(batches[2:]) == [False, True, False] and run.flush()
    ref = sgd(w0, reference_grad(w0, batches[2:4]))
    ref = sgd(ref, reference_grad(ref, batches[4:]))
    assert delta_err(s, w0, ref) < 1e-5
    assert int(s.opt.global_step.asnumpy().reshape(-1)[0]) == 2  # the skipped window is no update


def test_learning_rate_schedule_advances_once_per_update():
    w0 = initial_weights()
    batches = micro_batches(SIZES)
    schedule = [0.5, 0.2, 0.1, 0.05]
    s = Setup(w0, lr=schedule)
    cell = AccumulatorCell(s.opt, steps=3)
    run = Steps(s, cell)
    run.feed(batches)
    run.flush()
    ref = dict(w0)
    for t, i in enumerate(range(0, len(batches), 3)):
        ref = sgd(ref, reference_grad(ref, batches[i:i + 3]), lr=schedule[t])
    assert delta_err(s, w0, ref) < 1e-5
    assert int(s.opt.global_step.asnumpy().reshape(-1)[0]) == 3


def test_a_window_mixing_counted_and_uncounted_micro_batches_is_skipped():
    w0 = initial_weights()
    batches = micro_batches(SIZES[:4])
    s = Setup(w0)
    cell = AccumulatorCell(s.opt, steps=2)
    run = Steps(s, cell)
    assert run.feed(batches[:1]) == [False]
    assert run.feed(batches[1:2], weighted=False) == [True]  # closed, not stepped
    assert cell.skipped == 1 and int(s.opt.global_step.asnumpy().reshape(-1)[0]) == 0
    assert run.feed(batches[2:]) == [False, True]
    assert delta_err(s, w0, sgd(w0, reference_grad(w0, batches[2:]))) < 1e-5


def test_mid_window_checkpoint_reloaded_into_fresh_objects_finishes_the_window(tmp_path):
    w0 = initial_weights()
    batches = micro_batches(SIZES)
    straight = Setup(w0, optimizer="adam")
    run = Steps(straight, AccumulatorCell(straight.opt, steps=3, max_grad_norm=1.0))
    run.feed(batches)
    run.flush()

    first = Setup(w0, optimizer="adam")
    cell = AccumulatorCell(first.opt, steps=3, max_grad_norm=1.0)
    Steps(first, cell).feed(batches[:4])  # one window done, one micro-batch into the next
    path = str(tmp_path / "step.ckpt")
    ms.save_checkpoint(cell, path)  # the network, the optimizer's moments, the sums, the counters
    del first, cell

    resumed = Setup(initial_weights(seed=7), optimizer="adam")  # other weights: all must come back
    cell = AccumulatorCell(resumed.opt, steps=3, max_grad_norm=1.0)
    not_loaded, _ = ms.load_param_into_net(cell, ms.load_checkpoint(path))
    assert not_loaded == []
    assert cell.micro_batches == 1 and cell.windows == 1
    run = Steps(resumed, cell)
    assert run.feed(batches[4:]) == [False, True, False] and run.flush()
    for k in w0:
        np.testing.assert_allclose(resumed.weights()[k], straight.weights()[k], rtol=0, atol=1e-7)
    assert int(resumed.opt.global_step.asnumpy().reshape(-1)[0]) == 3


def test_refuses_bad_arguments():
    s = Setup(initial_weights())
    for bad, error in [(0, ValueError), (1.5, TypeError), (lambda step: 2, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="steps"):
            AccumulatorCell(s.opt, steps=bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        AccumulatorCell(s.opt, steps=2, max_grad_norm=0)
    with pytest.raises(TypeError, match="optimizer"):
        AccumulatorCell(object(), steps=2)


@pytest.mark.skipif(GRAPH, reason="already in GRAPH_MODE")
def test_graph_mode_in_a_fresh_process(tmp_path):
    code = (
        "import mindspore as ms; ms.set_context(mode=ms.GRAPH_MODE)\n"
        "import sys, pytest; sys.path.insert(0, %r)\n"
        "sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', %r, '-k', %r, '--basetemp', %r]))\n"
    ) % (HERE, os.path.join(HERE, "test_graph.py"),
         # one window size ending on a partial window and one that does not; the rest run in PyNative
         "(big_batch and jit and ((3 and True) or (4 and False))) or non_finite or checkpoint or schedule or flush_says",
         str(tmp_path / "t"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=HERE)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(GRAPH, reason="the workers choose their own mode")
def test_data_parallel_under_msrun_equals_the_single_process_big_batch(tmp_path):
    """Two msrun workers, uneven micro-batches and windows; one reduce per window."""
    msrun = shutil.which("msrun", path=os.path.dirname(sys.executable))
    assert msrun, "msrun comes with mindspore; it should sit next to this python"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               GA_OUT=str(tmp_path), PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [msrun, "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(_free_port()),
           "--log_dir", str(tmp_path / "logs"), "--join", "True", os.path.join(HERE, "dp_worker.py")]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env, cwd=str(tmp_path))
    except subprocess.TimeoutExpired:
        pytest.fail("msrun did not finish in 420 s: a rank is waiting on a reduce the other never made")
    logs = "".join(open(p).read()[-2000:] for p in sorted((tmp_path / "logs").glob("worker_*.log")))
    assert out.returncode == 0, out.stderr[-2000:] + logs
    import dp_worker

    for case in dp_worker.CASES:
        ranks = [dict(np.load(tmp_path / f"{case}_rank{r}.npz")) for r in range(2)]
        spec = dp_worker.CASES[case]
        data = [micro_batches(spec["sizes"][r], seed=10 + r) for r in range(2)]
        w0, ref = initial_weights(), initial_weights()
        k = spec["steps"]
        windows = max(-(-len(d) // k) for d in data)
        for t in range(windows):
            window = [b for d in data for b in d[t * k:(t + 1) * k]]
            ref = sgd(ref, reference_grad(ref, window))
        last_items = sum(float(b[2].sum()) for b in window)  # N of the last window, both ranks
        for r, got in enumerate(ranks):
            err = rel_err({x: got[x] - w0[x] for x in w0}, {x: ref[x] - w0[x] for x in w0})
            assert err < 1e-5, (case, r, err)
            assert int(got["reductions"]) == windows, (case, r, int(got["reductions"]), windows)
            assert int(got["micro_batches"]) == len(data[r])
            assert float(got["last_items"]) == last_items, (case, r)
            # Every flush here joins a close that holds items on some rank: each updated, and
            # says so (compiled, it said False before).
            assert got["flushed"].size >= 1 and got["flushed"].all(), (case, r, got["flushed"])
        for x in w0:
            np.testing.assert_array_equal(ranks[0][x], ranks[1][x])
    # docs/mindspore.md's data-parallel block, as written, on both workers: 6 micro-batches at
    # k = 4 are a window and a flushed partial one, each closed by one reduce.
    for r in range(2):
        docs = np.load(tmp_path / f"docs_rank{r}.npz")
        assert int(docs["windows"]) == 2 and int(docs["reductions"]) == 2, (r, dict(docs))
    # The negative control: had each rank stepped on its own data, the ranks would differ.
    assert rel_err(window_grad(w0, data[0][:k], True), window_grad(w0, data[0][:k] + data[1][:k], True)) > 0.05


def test_public_names_have_examples_that_run():
    import doctest

    import gradaccum.mindspore as gm

    for name in gm.__all__:
        assert ">>>" in (getattr(gm, name).__doc__ or ""), name
    for module in (gm, gm._cell, gm._eager):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0, module.__name__


def test_the_cell_applies_the_shared_weights_and_scale():
    # gradaccum._weights holds the arithmetic once; the compiled cell restates it in MindSpore
    # ops. Arbitrary gradients and counts: the update is sum_i w_i g_i * scale with w_i, scale
    # from the shared functions (reference 1, one planned micro-batch: weights n_i, scale 1/N).
    from mindspore import Parameter, Tensor, nn

    from gradaccum import _weights
    from gradaccum.mindspore import AccumulatorCell

    rng = np.random.default_rng(3)
    p0 = rng.normal(size=5)
    p = Parameter(Tensor(p0, ms.float32), name="p")
    cell = AccumulatorCell(nn.SGD([p], learning_rate=1.0), steps=3)
    grads, counts = [rng.normal(size=5) for _ in range(3)], [7, 2, 12]
    for g, n in zip(grads, counts):
        cell((Tensor(g, ms.float32),), Tensor(float(n), ms.float32))
    scale = _weights.boundary_scale(sum(counts), reference=1.0, planned=1)
    want = p0 - sum(_weights.provisional_weight(n, 1.0, 1) * g for g, n in zip(grads, counts)) * scale
    assert np.allclose(p.asnumpy(), want, rtol=1e-5, atol=1e-6)
