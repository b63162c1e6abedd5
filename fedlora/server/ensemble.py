"""Ensembles of adapters, evaluated beside the single global adapter.

Two kinds, as in the FL literature's "model ensemble" baselines: the last
``ensemble-size`` rounds' global adapters, or ``ensemble-size`` sites'
own adapters from the round just finished. Members share the frozen base,
so an ensemble is k adapter swaps and k forward passes over the test split;
their class probabilities are averaged. Reported per round as
``ensemble-accuracy`` and ``ensemble-loss`` next to the global metrics.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np
import torch

from fedlora.models.adapter import load_adapter_state
from fedlora.models.batches import EncodedDataset
from fedlora.models.inference import predict_proba


class EnsembleEvaluator:
    """Keeps ensemble members between rounds and scores their average."""

    def __init__(self, model: Any, test: EncodedDataset, mode: str, size: int):
        self.model, self.test, self.mode, self.size = model, test, mode, size
        self.recent: deque[dict[str, np.ndarray]] = deque(maxlen=size)

    def __call__(
        self, global_state: dict[str, np.ndarray], site_states: list[dict[str, np.ndarray]]
    ) -> dict[str, float]:
        """Ensemble metrics after a round ({} when there are too few members)."""
        if self.mode == "none":
            return {}
        self.recent.append(global_state)
        members = list(self.recent) if self.mode == "last-rounds" else site_states[: self.size]
        if len(members) < 2:
            return {}
        probs = torch.zeros(0)
        for state in members:
            load_adapter_state(self.model, state)
            p = predict_proba(self.model, self.test)
            probs = p if probs.numel() == 0 else probs + p
        probs = probs / len(members)
        labels = torch.tensor(self.test.labels)
        accuracy = float((probs.argmax(-1) == labels).float().mean())
        loss = float(-torch.log(probs[torch.arange(len(labels)), labels].clamp_min(1e-12)).mean())
        return {
            "ensemble-accuracy": accuracy,
            "ensemble-loss": loss,
            "ensemble-members": len(members),
        }
