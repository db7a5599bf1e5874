"""Tiny mixture-of-experts models of four transformers families, built from configs (random
weights, nothing from a hub): 2 layers, 4 experts, top-2, router loss coefficient 0.5."""

from __future__ import annotations

import torch
import transformers

from support.hf import VOCAB

COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, output_router_logits=True, router_aux_loss_coef=0.5,
              attention_dropout=0.0)
FAMILIES = {
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8)),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_experts=4, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0, bos_token_id=None)),
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, layer_types=["full_attention"] * 2,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


def model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    config_cls, model_cls, extra = FAMILIES[family]
    config = config_cls(**{**COMMON, **extra, **overrides})
    # The experts as a loop over experts: the grouped matmul kernel has no float64 (the reference).
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    return model_cls(config)


class TinyMoE(torch.nn.Module):
    """A per-token language model with top-k mixture-of-experts layers (no attention: padding
    cannot leak), returning the logits and each layer's router logits. ``jitter`` multiplies
    the router's input by uniform noise in training, as Mixtral's router jitter does."""

    def __init__(self, vocab: int = 37, dim: int = 16, experts: int = 4, top_k: int = 2, layers: int = 2,
                 jitter: float = 0.0):
        super().__init__()
        self.top_k, self.jitter = top_k, jitter
        self.emb = torch.nn.Embedding(vocab, dim)
        self.routers = torch.nn.ModuleList(torch.nn.Linear(dim, experts) for _ in range(layers))
        self.experts = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(experts))
                                           for _ in range(layers))
        self.head = torch.nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        h = self.emb(ids).reshape(-1, self.emb.embedding_dim)
        router_logits = []
        for router, experts in zip(self.routers, self.experts):
            x = h
            if self.training and self.jitter:
                x = x * torch.empty_like(x).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = router(x)
            router_logits.append(logits)
            weights, chosen = torch.topk(torch.softmax(logits, -1), self.top_k, dim=-1)
            weights = weights / weights.sum(-1, keepdim=True)
            out = torch.zeros_like(h)
            for e, expert in enumerate(experts):
                w = (weights * (chosen == e)).sum(-1, keepdim=True)
                out = out + w * torch.tanh(expert(h))
            h = h + out
        return self.head(h).reshape(*ids.shape, -1), tuple(router_logits)


COEF = 0.5


def terms(model, batch) -> dict:
    """{"lm": (token mean, tokens), "router": (router logits, mask)} of a micro-batch."""
    import torch.nn.functional as F

    ids, mask = batch["ids"], batch["mask"]
    logits, router_logits = model(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].reshape(-1).float()
    return {"lm": ((ce * valid).sum() / valid.sum(), valid.sum()), "router": (router_logits, mask.long())}


def reference(model, batches, top_k: int = 2) -> list[torch.Tensor]:
    """The float64 gradient of the big batch's loss: the token mean over every micro-batch plus
    COEF x the Switch Transformer load-balancing loss over the concatenated batch (written out
    here: fractions of the top-k assignments and mean probabilities over every real token of
    every layer)."""
    import copy

    import torch.nn.functional as F

    m = copy.deepcopy(model).double()
    m.eval()  # no jitter in the reference
    width = max(b["ids"].shape[1] for b in batches)
    ids = torch.cat([F.pad(b["ids"], (0, width - b["ids"].shape[1])) for b in batches])
    mask = torch.cat([F.pad(b["mask"], (0, width - b["mask"].shape[1])) for b in batches]).double()
    logits, router_logits = m(ids)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
    valid = mask[:, 1:].reshape(-1)
    lm = (ce * valid).sum() / valid.sum()
    rows = mask.reshape(-1)
    probs = torch.cat([torch.softmax(r, -1) for r in router_logits])  # [layers x tokens, experts]
    every = rows.repeat(len(router_logits))
    chosen = torch.topk(probs, top_k, dim=-1).indices
    onehot = torch.zeros_like(probs).scatter_(1, chosen, 1.0)
    fraction = (onehot * every[:, None]).sum(0) / every.sum()
    mean_prob = (probs * every[:, None]).sum(0) / every.sum()
    aux = probs.shape[1] * (fraction.detach() * mean_prob).sum()
    (lm + COEF * aux).backward()
    return [p.grad.detach().clone() for p in m.parameters()]


def data(rank: int = 0, sizes=(3, 1, 4, 2, 5, 1, 2, 3, 2, 4)) -> list[dict]:
    """Micro-batches of sequences of 2-24 tokens, padded to their own longest."""
    from support.matrix_cells import batch_of
    from support.reference import micro_batches

    return [batch_of(mb) for mb in micro_batches(list(sizes), seed=300 + rank)]


def train(model, loader, steps, precision: str = "fp32", **kw) -> tuple[list, list]:
    """The gradient each window hands the optimizer (lr 0), and the reports."""
    import gradaccum
    from gradaccum.moe import RouterLoss
    from support.reference import RecordingSGD

    counters = {"lm": lambda b: float(b["mask"][:, 1:].sum()),
                "router": RouterLoss(lambda b: (model(b["ids"])[1], b["mask"].long()), num_experts=4, top_k=2,
                                      coef=COEF)}
    opt = RecordingSGD(model.parameters(), lr=0.0)
    acc = gradaccum.Accumulator(model, opt, steps=steps, precision=precision, terms=counters, **kw)
    reports = []
    for window in acc.windows(loader):
        for batch in window:
            with window.autocast():
                out = terms(model, batch)
            window.backward(out)
        reports.append(window.step())
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731 (FSDP2: sharded)
    return [[full(g).float() for g in step] for step in opt.seen], reports


def two_ranks(rank: int, world: int) -> dict:
    """DDP, then FSDP2, over the router loss, k = 3, ranks' micro-batches differ (rank 1 has fewer)."""
    from support import matrix_cells as mc

    out = {}
    for wrap in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = mc._wrap(TinyMoE(), wrap)
        sizes = (3, 1, 4, 2, 5, 1) if rank == 0 else (2, 3, 1, 2)
        seen, reports = train(model, data(rank, sizes), 3)
        out[wrap] = {"seen": seen, "tokens": [r.tokens_per_expert for r in reports], "terms": [r.terms for r in reports]}
    return out
