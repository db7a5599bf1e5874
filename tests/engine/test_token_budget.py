"""Token-budget windows (gradaccum.data.TokenBudgetSampler): partition, exactness, resume, DDP.

Reference: the float64 gradient of the mean next-token loss over every sequence of a window
as one batch (``reference.big_batch_lm_grads``), which knows nothing of micro-batches.
"""

from __future__ import annotations

import copy

import pytest
import torch

import gradaccum
from gradaccum.data import TokenBudgetSampler, cut_by_tokens
from support.reference import RecordingSGD, TinyLM, big_batch_lm_grads, lm_mean_loss, make_sequences, rel_error


class Seqs(torch.utils.data.Dataset):
    def __init__(self, seqs):
        self.seqs = seqs

    def __len__(self):
        return len(self.seqs)

    def __getitem__(self, i):
        return self.seqs[i]


def test_cut_by_tokens_respects_the_budget_and_isolates_long_samples():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 60, (200,), generator=g).tolist() + [500, 80]
    runs = cut_by_tokens(lengths, max_tokens=120)
    assert sorted(i for r in runs for i in r) == list(range(len(lengths)))  # each sample exactly once
    for r in runs:
        longest = max(lengths[i] for i in r)
        assert len(r) * longest <= 120 or len(r) == 1
    assert [200] in runs  # longer than the budget: a micro-batch of its own


def test_windows_are_exact_sizes_and_split_like_distributed_sampler():
    lengths = [len(s) for s in make_sequences(103, seed=1)]
    for world in (1, 2, 3):
        ds = torch.utils.data.DistributedSampler(range(103), num_replicas=world, rank=world - 1, shuffle=True, seed=5)
        ds.set_epoch(2)
        sampler = TokenBudgetSampler(lengths, window=16, max_tokens=64, seed=5, rank=world - 1, world_size=world)
        sampler.set_epoch(2)
        want = list(ds)
        windows = sampler.windows()
        assert [sum(map(len, w)) for w in windows][:-1] == [16] * (len(windows) - 1)
        for w, start in zip(windows, range(0, len(want), 16)):
            assert sorted(i for mb in w for i in mb) == sorted(want[start:start + 16])
    assert sampler.windows(epoch=3) != sampler.windows(epoch=2)  # reshuffled by epoch


def _collate(seqs):
    return list(seqs)


def _run(model, loader, steps, sampler=None, epochs=1):
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=steps)
    for epoch in range(epochs):
        if sampler is not None:
            sampler.set_epoch(epoch)
        for window in acc.windows(loader):
            for seqs in window:
                loss, n = lm_mean_loss(model, seqs)
                window.backward(loss, num_items=n)
            window.step()
    return opt.seen


def test_token_budget_fixed_size_and_one_big_batch_give_the_same_update():
    seqs = make_sequences(70, seed=3, lo=2, hi=40)
    data = Seqs(seqs)
    sampler = TokenBudgetSampler([len(s) for s in seqs], window=16, max_tokens=80, seed=0)
    torch.manual_seed(0)
    model = TinyLM()
    budget = _run(copy.deepcopy(model), torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=_collate), sampler)
    windows = sampler.windows()
    assert len({len(w) for w in windows}) > 1  # windows really were cut into different numbers of micro-batches
    # Fixed micro-batches of 4 over the same windows (the last window is partial: 70 = 4 x 16 + 6).
    fixed_batches = [[seqs[i] for i in sorted(i for mb in w for i in mb)[j:j + 4]] for w in windows for j in range(0, 16, 4)]
    fixed_batches = [b for b in fixed_batches if b]
    fixed = _run(copy.deepcopy(model), fixed_batches, steps=lambda s: 4 if s < len(windows) - 1 else 2)
    assert len(budget) == len(fixed) == len(windows) == 5
    for w, got_budget, got_fixed in zip(windows, budget, fixed):
        want = big_batch_lm_grads(model, [[seqs[i] for mb in w for i in mb]])
        assert rel_error(got_budget, want) < 1e-5
        assert rel_error(got_fixed, want) < 1e-5


def test_hf_data_collator_with_padding_and_a_dataloader():
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(30)}, unk_token="t1")),
        pad_token="t0")
    g = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(2, 30, (int(n),), generator=g).tolist(), "label": int(n) % 3}
            for n in torch.randint(2, 50, (40,), generator=g)]
    sampler = TokenBudgetSampler([len(r["input_ids"]) for r in rows], window=12, max_tokens=100, seed=1)
    loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=transformers.DataCollatorWithPadding(tok))

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(30, 8), torch.nn.Linear(8, 3)

        def forward(self, input_ids, attention_mask):
            m = attention_mask.unsqueeze(-1).to(self.emb.weight.dtype)
            return self.head((self.emb(input_ids) * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    model = Classifier()
    start = copy.deepcopy(model).double()
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=sampler)
    for window in acc.windows(loader):
        for b in window:
            logits = model(b["input_ids"], b["attention_mask"])
            window.backward(torch.nn.functional.cross_entropy(logits, b["labels"]), num_items=len(b["labels"]))
        window.step()
    for w, got in zip(sampler.windows(), opt.seen):
        idx = [i for mb in w for i in mb]
        start.zero_grad()
        logits = torch.cat([start(torch.tensor([rows[i]["input_ids"]]), torch.ones(1, len(rows[i]["input_ids"]))) for i in idx])
        torch.nn.functional.cross_entropy(logits, torch.tensor([rows[i]["label"] for i in idx])).backward()
        assert rel_error(got, [p.grad for p in start.parameters()]) < 1e-5


def test_resume_mid_epoch_mid_window_gives_the_same_weights():
    seqs = make_sequences(60, seed=6, lo=2, hi=40)
    data = Seqs(seqs)
    lengths = [len(s) for s in seqs]
    torch.manual_seed(0)
    straight = TinyLM()
    resumed = copy.deepcopy(straight)

    def train(model, opt, acc, sampler, epoch, start=0, stop_after=None):
        sampler.set_epoch(epoch, start=start)
        loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=_collate)
        consumed = start
        for window in acc.windows(loader):
            for seqs_ in window:
                loss, n = lm_mean_loss(model, seqs_)
                window.backward(loss, num_items=n)
                consumed += 1
                if consumed == stop_after:  # a crash right after this micro-batch's checkpoint
                    return copy.deepcopy((acc.state_dict(), opt.state_dict(), model.state_dict())), consumed
            window.step()
        return None, consumed

    sampler = TokenBudgetSampler(lengths, window=16, max_tokens=80, seed=2)
    opt = torch.optim.AdamW(straight.parameters(), lr=1e-2)
    acc = gradaccum.Accumulator(straight, opt, steps=sampler)
    for epoch in range(2):
        train(straight, opt, acc, sampler, epoch)

    sampler = TokenBudgetSampler(lengths, window=16, max_tokens=80, seed=2)
    opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    acc = gradaccum.Accumulator(resumed, opt, steps=sampler)
    train(resumed, opt, acc, sampler, 0)
    first_window = len(sampler.windows(epoch=1)[0])
    saved, consumed = train(resumed, opt, acc, sampler, 1, stop_after=first_window + 2)  # mid second window
    assert saved is not None and saved[0]["state"]["micro_batches"] == 2
    model2 = TinyLM()
    model2.load_state_dict(saved[2])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    opt2.load_state_dict(saved[1])
    sampler2 = TokenBudgetSampler(lengths, window=16, max_tokens=80, seed=2)
    acc2 = gradaccum.Accumulator(model2, opt2, steps=sampler2)
    acc2.load_state_dict(saved[0])
    train(model2, opt2, acc2, sampler2, 1, start=consumed)
    for a, b in zip(straight.parameters(), model2.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.multiprocess
def test_ddp_ranks_with_different_cuts_are_exact_and_do_not_hang(tmp_path):
    from support import dist_workers

    results = dist_workers.spawn(dist_workers.token_budget_lm, 2, tmp_path)
    assert all(r.get("error") is None for r in results), results
    seqs = make_sequences(50, seed=8, lo=2, hi=40)
    torch.manual_seed(0)
    model = TinyLM()
    plans = [r["plan"] for r in results]
    assert any(a != b for a, b in zip(*plans))  # some window was cut differently on the two ranks
    for w in range(len(plans[0])):
        want = big_batch_lm_grads(model, [[seqs[i] for r in results for i in r["windows"][w]]])
        for r in results:
            assert rel_error(r["seen"][w], want) < 1e-5, (w, rel_error(r["seen"][w], want))
