"""The shared reference of the MindSpore tests: a tiny network and its big batch in numpy.

The model is a token-level classifier (embedding -> dense -> softmax over the vocabulary),
small enough that its big-batch gradient can be written out by hand in float64: the
reference shares no code with MindSpore or with the accumulator.
"""

from __future__ import annotations

import mindspore as ms
import numpy as np
from mindspore import nn, ops

V, D, LR = 11, 6, 0.5


class TokenNet(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.out = nn.Dense(D, V)

    def construct(self, ids):
        return self.out(self.emb(ids))


def initial_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"E": rng.normal(0, 1, (V, D)), "W": rng.normal(0, 0.5, (V, D)), "b": rng.normal(0, 0.1, V)}


def micro_batches(sizes, seed: int = 1):
    """(ids, targets, mask) micro-batches of uneven size, padded to different lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for rows, length in sizes:
        ids = rng.integers(0, V, (rows, length))
        targets = rng.integers(0, V, (rows, length))
        lengths = rng.integers(1, length + 1, rows)
        mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.float64)
        out.append((ids, targets, mask))
    return out


def reference_grad(w: dict[str, np.ndarray], batches) -> dict[str, np.ndarray]:
    """Gradient of the mean token loss over all batches at once, float64, by hand."""
    ids = np.concatenate([b[0][b[2] > 0] for b in batches])
    targets = np.concatenate([b[1][b[2] > 0] for b in batches])
    h = w["E"][ids]
    logits = h @ w["W"].T + w["b"]
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(ids)), targets] -= 1.0
    dlogits = p / len(ids)
    g_e = np.zeros_like(w["E"])
    np.add.at(g_e, ids, dlogits @ w["W"])
    return {"E": g_e, "W": dlogits.T @ h, "b": dlogits.sum(0)}


def reference_loss(w, batches) -> float:
    ids = np.concatenate([b[0][b[2] > 0] for b in batches])
    targets = np.concatenate([b[1][b[2] > 0] for b in batches])
    logits = w["E"][ids] @ w["W"].T + w["b"]
    logz = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    return float((logz - logits[np.arange(len(ids)), targets]).mean())


class Setup:
    """A MindSpore network holding ``weights``, an optimizer and a gradient function."""

    def __init__(self, weights, optimizer: str = "sgd", jit: bool = False, lr=LR) -> None:
        self.net = TokenNet()
        names = {"emb.embedding_table": "E", "out.weight": "W", "out.bias": "b"}
        for p in self.net.trainable_params():
            p.set_data(ms.Tensor(weights[names[p.name]].astype(np.float32)))
        params = self.net.trainable_params()
        self.opt = nn.SGD(params, learning_rate=lr) if optimizer == "sgd" else nn.Adam(params, learning_rate=1e-2)

        def loss_fn(ids, targets, mask):
            logp = ops.log_softmax(self.net(ids), -1)
            nll = -ops.gather_elements(logp, -1, targets.expand_dims(-1)).squeeze(-1)
            return (nll * mask).sum() / mask.sum()  # the mean over this micro-batch's tokens

        self.loss_fn = loss_fn
        grad_fn = ms.value_and_grad(loss_fn, None, self.opt.parameters)
        self.grad_fn = ms.jit(grad_fn) if jit else grad_fn

    def grads(self, batch):
        return self.grad_fn(*tensors(batch))

    def weights(self) -> dict[str, np.ndarray]:
        p = {q.name: q.asnumpy().astype(np.float64) for q in self.net.trainable_params()}
        return {"E": p["emb.embedding_table"], "W": p["out.weight"], "b": p["out.bias"]}


def tensors(batch):
    """A numpy (ids, targets, mask) micro-batch as MindSpore tensors."""
    ids, targets, mask = batch
    return ms.Tensor(ids, ms.int32), ms.Tensor(targets, ms.int32), ms.Tensor(mask, ms.float32)


def rel_err(a: dict, b: dict) -> float:
    num = sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a)
    den = sum(float(np.sum(b[k] ** 2)) for k in b)
    return (num / den) ** 0.5


def sgd(w, g, lr=LR):
    return {k: w[k] - lr * g[k] for k in w}


SIZES = [(2, 9), (5, 3), (1, 12), (3, 6), (4, 2), (2, 7), (1, 5)]
