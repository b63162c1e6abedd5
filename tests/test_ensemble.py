"""Ensemble evaluation: averaged probabilities of adapters on the test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.data.sources import load_table
from fedlora.models.adapter import adapter_state, load_adapter_state
from fedlora.models.batches import encode
from fedlora.models.inference import evaluate, predict_proba
from fedlora.models.loading import build_model, load_tokenizer
from fedlora.server.ensemble import EnsembleEvaluator
from fedlora.settings import LoraSettings


def _setup(tiny_model_dir: Path, text_csv: Path):
    model = build_model(tiny_model_dir, 3, LoraSettings(rank=4, alpha=8, dropout=0.0), 0)
    test = encode(load_tokenizer(tiny_model_dir), load_table(text_csv, "text", "label", None), 32)
    base = adapter_state(model)
    rng = np.random.default_rng(0)
    states = [
        {k: (v + rng.normal(0, 0.5, v.shape)).astype(np.float32) for k, v in base.items()}
        for _ in range(3)
    ]
    return model, test, states


def test_identical_members_equal_the_single_adapter(tiny_model_dir: Path, text_csv: Path) -> None:
    model, test, states = _setup(tiny_model_dir, text_csv)
    load_adapter_state(model, states[0])
    loss, acc, _ = evaluate(model, test)
    ens = EnsembleEvaluator(model, test, "sites", 3)
    out = ens(states[0], [states[0], states[0]])
    assert out["ensemble-accuracy"] == pytest.approx(acc)
    assert out["ensemble-loss"] == pytest.approx(loss, rel=1e-5)


def test_members_are_averaged_in_probability_space(tiny_model_dir: Path, text_csv: Path) -> None:
    model, test, states = _setup(tiny_model_dir, text_csv)
    probs = []
    for s in states[:2]:
        load_adapter_state(model, s)
        probs.append(predict_proba(model, test))
    mean = (probs[0] + probs[1]) / 2
    expected = float((mean.argmax(-1) == torch.tensor(test.labels)).float().mean())
    ens = EnsembleEvaluator(model, test, "last-rounds", 2)
    assert ens(states[2], []) == {}  # one member is no ensemble
    ens.recent.clear()
    ens(states[0], [])
    out = ens(states[1], [])
    assert out["ensemble-members"] == 2
    assert out["ensemble-accuracy"] == pytest.approx(expected)
    out3 = ens(states[2], [])  # window of 2 slides: members are states 1 and 2
    assert out3["ensemble-members"] == 2
