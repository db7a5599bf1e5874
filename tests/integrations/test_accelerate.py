"""gradaccum.accelerate.ExactAccelerator against the float64 big batch, and stock Accelerate as the control."""

from __future__ import annotations

import copy

import pytest
import torch

accelerate = pytest.importorskip("accelerate")

from gradaccum.accelerate import ExactAccelerator  # noqa: E402
from support.reference import TinyLM, big_batch_lm_grads, lm_mean_loss, micro_batches, rel_error  # noqa: E402


class Grabbing(torch.optim.SGD):
    """SGD (lr 0) that records the gradient at each real step."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen.append([p.grad.detach().double().clone() for g in self.param_groups for p in g["params"]])
        return super().step(closure)


def train(accelerator_cls, model, data, k, exact=True, max_grad_norm=None, guard=True):
    accelerator = accelerator_cls(gradient_accumulation_steps=k, cpu=True)
    opt = Grabbing(model.parameters())
    loader = torch.utils.data.DataLoader(data, batch_size=None)  # each item is one micro-batch
    model, opt, loader = accelerator.prepare(model, opt, loader)
    for seqs in loader:
        with accelerator.accumulate(model):
            loss, n = lm_mean_loss(model, seqs)
            if exact:
                accelerator.backward(loss, num_items=n)
            else:
                accelerator.backward(loss)
            if max_grad_norm and (accelerator.sync_gradients or not guard):
                accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad()
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    return opt.optimizer.seen if hasattr(opt, "optimizer") else opt.seen


@pytest.mark.parametrize("max_grad_norm,guard", [(None, True), (0.05, True), (0.05, False), (1.0, False)])
def test_exact_accelerator_equals_the_big_batch_and_stock_does_not(max_grad_norm, guard):
    # guard=False: clip_grad_norm_ on every micro-batch, as docs/accelerate.md's loop does.
    sizes = [3, 5, 2, 4, 6, 1, 3, 4, 5, 2]  # k=4: windows of 4, 4 and a partial 2
    data = micro_batches(sizes, seed=5)
    torch.manual_seed(0)
    model = TinyLM()
    exact = train(ExactAccelerator, copy.deepcopy(model), data, 4, max_grad_norm=max_grad_norm, guard=guard)
    stock = train(accelerate.Accelerator, copy.deepcopy(model), data, 4, exact=False, max_grad_norm=max_grad_norm)
    assert len(exact) == len(stock) == 3
    errors_exact, errors_stock = [], []
    for w, (got, base) in enumerate(zip(exact, stock)):
        want = big_batch_lm_grads(model, data[4 * w: 4 * w + 4])
        if max_grad_norm:
            norm = sum(float(x.pow(2).sum()) for x in want) ** 0.5
            want = [x * min(1.0, max_grad_norm / (norm + 1e-6)) for x in want]
        errors_exact.append(rel_error(got, want))
        errors_stock.append(rel_error(base, want))
    assert max(errors_exact) < 1e-5, errors_exact
    # Stock divides by k: variable-length windows and the half-size last window are off.
    assert max(errors_stock) > 0.05, errors_stock


@pytest.mark.multiprocess
def test_ddp_two_ranks_one_gradient_all_reduce_per_step(tmp_path):
    from support import dist_workers

    results = dist_workers.spawn(dist_workers.accelerate_exact, 2, tmp_path)
    assert all(r.get("error") is None for r in results), results
    torch.manual_seed(0)
    model = TinyLM()
    per_rank = [micro_batches(s, seed=40 + r) for r, s in enumerate(dist_workers.ACCELERATE_SIZES)]
    for w in range(len(results[0]["seen"])):
        want = big_batch_lm_grads(model, [mb for r in range(2) for mb in per_rank[r][3 * w: 3 * w + 3]])
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5
    for r in results:
        assert r["buckets_per_step"] == [1] * len(r["seen"])  # DDP's one all-reduce (one bucket) per step


def _clipped(want, max_norm):
    if not max_norm:
        return want
    norm = sum(float(x.pow(2).sum()) for x in want) ** 0.5
    return [x * min(1.0, max_norm / (norm + 1e-6)) for x in want]


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_several_terms_equal_the_big_batch(max_grad_norm):
    # A token mean plus a mean over long sequences (absent from some micro-batches, the first
    # among them), k=4 over 10 micro-batches: windows of 4, 4 and a partial 2.
    from support import matrix_cells as mc
    from support import terms_cells as tc

    data = mc.rank_data("counts", 1, 2) + mc.rank_data("counts", 0, 1)[:4]
    net = tc.model()
    model = copy.deepcopy(net)
    accelerator = ExactAccelerator(gradient_accumulation_steps=4, cpu=True)
    opt = Grabbing(model.parameters())
    model, opt, loader = accelerator.prepare(model, opt, torch.utils.data.DataLoader(data, batch_size=None))
    terms = []
    for batch in loader:
        with accelerator.accumulate(model):
            accelerator.backward(mc.term_losses(model, batch))
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm) if max_grad_norm else None
            opt.step()
            opt.zero_grad()
            if accelerator.sync_gradients:
                terms.append(accelerator.last_window_terms)
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    seen = opt.optimizer.seen
    assert len(seen) == 3
    for w, got in enumerate(seen):
        want, values = tc.reference(net, data[4 * w: 4 * w + 4])
        assert rel_error(got, _clipped(want, max_grad_norm)) < 1e-5, w
        assert terms[w] == pytest.approx(values, rel=1e-5)


@pytest.mark.multiprocess
def test_several_terms_on_two_ddp_ranks(tmp_path):
    max_grad_norm = 0.05  # clipped: the window's gradient whole (one process checks it unclipped too)
    from support import dist_workers
    from support import matrix_cells as mc
    from support import terms_cells as tc

    results = dist_workers.spawn(dist_workers.accelerate_terms, 2, tmp_path, max_grad_norm)
    assert all(r.get("error") is None for r in results), results
    data = [mc.rank_data("counts", r, 2) for r in range(2)]
    net = tc.model()
    for w in range(2):
        want, values = tc.reference(net, data[0][3 * w: 3 * w + 3] + data[1][3 * w: 3 * w + 3])
        for r in results:
            assert rel_error(r["seen"][w], _clipped(want, max_grad_norm)) < 1e-5
            assert r["terms"][w] == pytest.approx(values, rel=1e-5)


@pytest.mark.multiprocess
def test_the_docs_loop_runs_as_written(tmp_path):
    import pathlib
    import re
    import subprocess
    import sys

    doc = (pathlib.Path(__file__).parents[2] / "docs" / "accelerate.md").read_text()
    script = tmp_path / "train_acc.py"
    script.write_text(re.search(r"After \(a whole script.*?```python\n(.*?)```", doc, re.S).group(1))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(re.findall(r"window of \d+ tokens", out.stdout)) == 3  # 10 micro-batches, k=4: 4, 4 and 2


def test_the_window_tally_is_saved_and_restored_with_the_accelerator_state(tmp_path):
    # save_state()/load_state() carry the tally (registered for checkpointing): its reference,
    # which every rank's provisional weights share, and an open window's counts.
    torch.manual_seed(0)
    model = TinyLM()
    accelerator = ExactAccelerator(gradient_accumulation_steps=4, cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    for seqs in micro_batches([3, 5, 2, 4, 6, 1], seed=3):
        with accelerator.accumulate(model):
            loss, n = lm_mean_loss(model, seqs)
            accelerator.backward(loss, num_items=n)
            opt.step()
            opt.zero_grad()
    saved = accelerator.tally.state_dict()
    assert saved["micro_batches"] == 2 and saved["reference"] != 1.0  # one window closed, one open
    accelerator.save_state(str(tmp_path / "state"))
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    other = ExactAccelerator(gradient_accumulation_steps=4, cpu=True)
    model2 = TinyLM()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    model2, opt2 = other.prepare(model2, opt2)
    other.load_state(str(tmp_path / "state"))
    assert other.tally.state_dict() == saved
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
