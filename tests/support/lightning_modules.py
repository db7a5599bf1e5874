"""LightningModules and an optimizer that records what it applies, shared by the Lightning
tests and their 2-rank workers."""

from __future__ import annotations

import lightning.pytorch as pl
import torch

from support.reference import lm_mean_loss


class RecordingSGD(torch.optim.SGD):
    """SGD (lr 0) that records the gradient it applies: Lightning runs the window's last
    micro-batch inside ``step(closure)``, so the closure runs first."""

    def __init__(self, params, lr=0.0):
        super().__init__(params, lr=lr)
        self.seen = []

    def step(self, closure=None):
        loss = closure() if closure is not None else None
        with torch.no_grad():
            self.seen.append([p.grad.detach().double().clone() if p.grad is not None else torch.zeros_like(p)
                              for g in self.param_groups for p in g["params"]])
        super().step()
        return loss


class Module(pl.LightningModule):
    def __init__(self, net, exact=True):
        super().__init__()
        self.net, self.exact = net, exact
        self.opt = None

    def training_step(self, seqs, batch_idx):
        loss, n = lm_mean_loss(self.net, seqs)
        return {"loss": loss, "num_items": n} if self.exact else loss

    def configure_optimizers(self):
        self.opt = RecordingSGD(self.parameters(), lr=0.0)
        return self.opt


class TermsModule(Module):
    """training_step returns {"loss": {term: (mean, n)}}: a token mean and a sequence mean."""

    def training_step(self, batch, batch_idx):
        from support import matrix_cells as mc

        return {"loss": mc.term_losses(self.net, batch)}


