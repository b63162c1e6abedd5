"""The feature centre's arithmetic: the per-example clip and the federation's mean.

The nodes release (clipped, under local DP noised) sums and counts of their
sentence vectors (:mod:`fedlora.client.centering`); the server combines them
into the centre (:mod:`fedlora.server.loop`). Both sides use these.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.config import RunConfig


def clip_rows(features: torch.Tensor, clip: float) -> torch.Tensor:
    """Scale every row with L2 norm above ``clip`` down to ``clip``."""
    norms = features.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return features * (clip / norms).clamp(max=1.0)


def sum_clip(cfg: RunConfig) -> float:
    """``R``: the per-example clip of the summed vector (grows with the pooled layers)."""
    return cfg.lora.feature_center_clip * math.sqrt(cfg.lora.pooling_layers)


def combine(sums: list[np.ndarray], counts: list[float]) -> np.ndarray:
    """The federation's centre from the nodes' (possibly noisy) sums and counts.

    The count is floored at 1 so a tiny, heavily noised federation still gets
    a finite centre (a poor one, which the accuracy shows).
    """
    total = np.sum(np.stack(sums), axis=0)
    return (total / max(float(sum(counts)), 1.0)).astype(np.float32)
