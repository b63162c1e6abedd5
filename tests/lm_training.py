"""Full-batch AdamW on the LoRA parameters of a causal LM: the plain training
loop the tests use to make a tiny Llama learn (or memorise) a handful of rows."""

from __future__ import annotations

from typing import Any

import torch

from fedlora.models.causal_lm import lm_loss


def fit_full_batch(model: Any, batch: Any, lr: float, steps: int) -> None:
    """``steps`` AdamW steps on one batch, trainable parameters only."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss, _right = lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
