"""Shared fixtures: a tiny BERT (seconds, not minutes) and small text files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.simulations.tiny import (
    LABELS,
    WORDS,
    make_text_csv,
    make_tiny_model,
    tiny_run_config,
)

__all__ = ["LABELS", "WORDS", "make_text_csv", "make_tiny_model", "tiny_run_config"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_text_csv(tmp_path_factory.mktemp("data") / "news.csv")


@pytest.fixture
def flower_task() -> object:
    """Flower 1.41 needs a task identity to build Messages outside a running app."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield TaskIdentity
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved
