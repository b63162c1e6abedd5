"""Shared fixtures: a tiny BERT (seconds, not minutes) and small text files."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = {
    "sport": [
        "match",
        "goal",
        "team",
        "player",
        "coach",
        "league",
        "score",
        "win",
        "season",
        "club",
    ],
    "money": [
        "bank",
        "market",
        "shares",
        "profit",
        "price",
        "trade",
        "growth",
        "economy",
        "loan",
        "fund",
    ],
    "tech": [
        "software",
        "phone",
        "internet",
        "chip",
        "computer",
        "data",
        "network",
        "app",
        "code",
        "robot",
    ],
}
LABELS = ("money", "sport", "tech")


def _vocab() -> list[str]:
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = sorted({w for ws in WORDS.values() for w in ws} | {"the", "a", "and", "of"})
    return special + letters + ["##" + c for c in letters] + list("0123456789.,!?") + words


def make_tiny_model(folder: Path, hidden: int = 16) -> Path:
    """Save a tiny BertModel + tokenizer to ``folder`` (like a real model folder)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return folder


def make_text_csv(path: Path, n: int = 120, seed: int = 0, sites: int = 0) -> Path:
    """A learnable 3-class CSV: each text uses its class's words."""
    rng = random.Random(seed)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label", "site"] if sites else ["text", "label"])
        for i in range(n):
            label = LABELS[i % 3]
            text = " ".join(rng.choice(WORDS[label]) for _ in range(rng.randint(4, 10)))
            row = [text, label] + ([f"site-{i % sites}"] if sites else [])
            writer.writerow(row)
    return path


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
