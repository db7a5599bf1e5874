"""Every Python block of README.md and docs/ runs as written.

A page's blocks run in order in one namespace, as a reader pastes them one after another.
What a page leaves to the reader (their model, loader, optimizer) comes from a small
harness per page, and a few hooks set up what a block continues from (an open window, a
process group). Whole scripts that need several processes or a long run are executed by
their own tests (``ELSEWHERE``); the MindSpore blocks run in ``tests_mindspore``. A block
that none of these covers fails ``test_every_block_is_covered``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = ["README.md"] + sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md"))
ELSEWHERE = {
    ("docs/accelerate.md", 1): "integrations/test_accelerate.py::test_the_docs_loop_runs_as_written",
    ("docs/deepspeed.md", 0): "integrations/test_deepspeed.py::test_the_docs_loop_runs_as_written_under_torchrun",
    ("docs/terms.md", 0): "engine/test_terms.py::test_the_docs_example_runs_as_written",
    ("docs/distributed.md", 0): "test_the_distributed_page_runs_under_torchrun (below)",
    ("docs/model-parallel.md", 0): "test_the_model_parallel_page_runs_on_four_ranks (below)",
    ("docs/model-parallel.md", 1): "test_the_model_parallel_page_runs_on_four_ranks (below)",
    ("docs/model-parallel.md", 2): "test_the_model_parallel_page_runs_on_four_ranks (below)",
}


def blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.S)


def mindspore(page: str, code: str) -> bool:
    return page == "docs/mindspore.md" or "gradaccum.mindspore" in code


# -- what the pages leave to the reader ---------------------------------------------------

def _gpt2(vocab: int = 100) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=1, n_head=2,
                                                                n_positions=64))


def _lm_batches(lengths=(7, 19, 4, 12, 9)) -> list[dict]:
    out = []
    for n in lengths:
        ids = torch.randint(0, 100, (2, n))
        labels = ids.clone()
        labels[1, n // 2:] = -100  # rows with fewer predicted tokens
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _classifier_loader() -> list:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)) for n in (4, 7, 2, 5, 3)]


def _pytorch(ns: dict) -> None:
    model = torch.nn.Linear(8, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ns.update(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_loader=_classifier_loader(),
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), epochs=1)


def _open_window(ns: dict) -> None:
    """pytorch.md's finish/close block continues from an open window with its backwards done."""
    import gradaccum

    model, optimizer = ns["model"], ns["optimizer"]
    acc = gradaccum.Accumulator(model, optimizer, steps=2)
    window = next(iter(acc.windows(ns["train_loader"])))
    for inputs, labels in window:
        window.backward(ns["criterion"](model(inputs), labels), num_items=len(labels))

    class EMA:
        def update(self, model: torch.nn.Module) -> None:
            pass

    ns.update(window=window, log_histograms=lambda model: None, ema=EMA())


def _token_budget(ns: dict) -> None:
    """pytorch.md's token-budget block: a tokenized dataset, its tokenizer, a classifier."""
    import datasets
    import transformers

    from gradaccum.recipes import assets

    tok = transformers.AutoTokenizer.from_pretrained(assets.default_model_dir())
    texts = ["good", "a long and rather detailed review of the drug", "bad side effects", "fine", "it helped a lot"] * 4
    enc = tok(texts, truncation=True, max_length=32)
    cfg = transformers.BertConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    ns.update(tok=tok, dataset=datasets.Dataset.from_dict({"input_ids": enc["input_ids"],
                                                           "labels": [i % 2 for i in range(len(texts))]}),
              model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _coupled(ns: dict) -> None:
    import gradaccum
    from support import coupled

    model = coupled.BiEncoder()
    ns.update(gradaccum=gradaccum, torch=torch, model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
              loader=coupled.pair_batches([3, 4, 2, 5, 3, 4, 2, 3]),
              info_nce=lambda q, d: coupled.info_nce(q, d, model.log_scale))


def _process_group(ns: dict) -> None:
    """coupled.md's DDP block: a process group (one gloo rank here; torchrun in real use)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    ns["DistributedDataParallel"] = DistributedDataParallel


def _lightning(ns: dict) -> None:
    import lightning.pytorch as pl

    ns["pl"] = pl


def _pitfalls(ns: dict) -> None:
    import torch.nn.functional as F

    import gradaccum

    torch.manual_seed(0)
    ns.update(gradaccum=gradaccum, F=F, model=torch.nn.Linear(8, 3), x=torch.randn(12, 8), y=torch.randint(0, 3, (12,)))


def _transformers(ns: dict) -> None:
    rows = [{"input_ids": (ids := torch.randint(0, 100, (8,)).tolist()), "labels": ids} for _ in range(16)]
    model = _gpt2()
    ns.update(model=model, train_dataset=rows, batch=_lm_batches()[0], loader=_lm_batches(),
              optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def _accelerate(ns: dict) -> None:
    model = _gpt2()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ns.update(model=model, optimizer=optimizer, loader=torch.utils.data.DataLoader(_lm_batches(), batch_size=None),
              scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0))


HARNESS: dict[str, Callable[[dict], None]] = {
    "docs/pytorch.md": _pytorch, "docs/coupled.md": _coupled, "docs/lightning.md": _lightning,
    "docs/pitfalls.md": _pitfalls, "docs/transformers.md": _transformers, "docs/accelerate.md": _accelerate,
}
HOOKS: dict[tuple[str, int], Callable[[dict], None]] = {
    ("docs/pytorch.md", 2): _open_window, ("docs/pytorch.md", 3): _token_budget, ("docs/coupled.md", 1): _process_group,
}
NEEDS = {"docs/lightning.md": "lightning", "docs/accelerate.md": "accelerate", "docs/transformers.md": "trl"}


def test_every_block_is_covered():
    found = [(page, i) for page in PAGES for i, code in enumerate(blocks(page)) if not mindspore(page, code)]
    assert found, "no Python block found"
    assert set(ELSEWHERE) <= set(found), set(ELSEWHERE) - set(found)  # a block moved: say where it runs now


@pytest.mark.parametrize("page", [p for p in PAGES if any(not mindspore(p, c) for c in blocks(p))])
def test_the_pages_blocks_run_as_written(page, tmp_path, monkeypatch):
    if page in NEEDS:
        pytest.importorskip(NEEDS[page])
    monkeypatch.chdir(tmp_path)  # blocks that write (a Trainer's output_dir) write here
    ns: dict[str, Any] = {"__name__": "__doc_sample__"}
    HARNESS.get(page, lambda ns: None)(ns)
    try:
        for i, code in enumerate(blocks(page)):
            if mindspore(page, code) or (page, i) in ELSEWHERE:
                continue
            if (page, i) in HOOKS:
                HOOKS[page, i](ns)
            exec(compile(code, f"{page} block {i}", "exec"), ns)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        if "accelerate" in sys.modules:  # an Accelerator made by a block must not leak into later tests
            sys.modules["accelerate"].state.AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.multiprocess
def test_the_distributed_page_runs_under_torchrun(tmp_path):
    from support import launch

    prelude = '''import os
import types
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
import gradaccum
from support.reference import TinyLM, micro_batches, pad

torch.manual_seed(0)


class LM(TinyLM):  # a model whose forward takes **batch and returns .loss, as the page assumes
    def forward(self, ids, mask):
        logits = super().forward(ids)[:, :-1]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                               reduction="none")
        valid = mask[:, 1:].reshape(-1).float()
        return types.SimpleNamespace(loss=(ce * valid).sum() / valid.sum())


model = LM()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
loader = [dict(zip(("ids", "mask"), pad(seqs))) for seqs in micro_batches([2, 3, 2, 1, 2], seed=int(os.environ["RANK"]))]
count = lambda batch: int(batch["mask"][:, 1:].sum())
'''
    script = tmp_path / "page.py"
    script.write_text(prelude + blocks("docs/distributed.md")[0])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], capture_output=True, text=True, env=launch.env(), timeout=240, cwd=tmp_path)
    assert launch.finished(proc), proc.stderr[-3000:]
    assert os.path.exists(script)


@pytest.mark.multiprocess
def test_the_model_parallel_page_runs_on_four_ranks(tmp_path):
    """Every block, as written, under torchrun on 4 CPU ranks, over what they leave to the reader."""
    from support import launch

    prelude = '''import torch
import gradaccum
from support.model_parallel import MLPLM
from support.pipeline import Back, Front, step_data

dp, tp, replicas, stages = 2, 2, 2, 2
torch.manual_seed(0)
model = MLPLM()
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
stage_modules = [Front(), Back()]
'''
    between = '''
steps = [step_data(int(torch.distributed.get_rank()) // 2, s, rows=8) for s in range(2)]  # 4 micro-batches of 2
'''
    deepspeed_reader = '''
front, back = Front(), Back()
layers = [front.emb, front.w1, torch.nn.Tanh(), back.w2, torch.nn.Tanh(), back.head]
ds_config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "steps_per_print": 10**9,
             "zero_allow_untested_optimizer": True}
num_steps = 2
def _micro_batches():  # this replica's micro-batches: the engine (built in the block) knows which it is
    replica = engine.grid.get_data_parallel_id()
    for s in range(num_steps):
        ids, target = step_data(replica, s)
        yield from ((ids[i:i + 2], target[i:i + 2]) for i in range(0, 6, 2))
micro_batches = _micro_batches()
'''
    code = blocks("docs/model-parallel.md")
    script = tmp_path / "page.py"
    script.write_text(prelude + code[0] + between + code[1] + deepspeed_reader + code[2] + "\ngradaccum.end_rank()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                           str(script)], capture_output=True, text=True, env=launch.env(DS_ACCELERATOR="cpu"),
                          timeout=240, cwd=tmp_path)
    assert launch.finished(proc), proc.stderr[-3000:]
