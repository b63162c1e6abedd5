"""A tiny BERT and a learnable toy corpus, for tests and quick experiments.

A 1-layer, 16-wide BERT with a 100-token WordPiece vocabulary trains in
seconds on 2 CPU cores, so the whole federated path (real Flower, real PEFT,
real Opacus) can be exercised without the 22.7M-parameter MiniLM. Used by
fedlora's tests, ``bench/sim_scale.py`` and ``experiments/sweep-tiny.toml``.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

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


def make_tiny_model(folder: Path, hidden: int = 16, layers: int = 1) -> Path:
    """Save a tiny BertModel + tokenizer to ``folder`` (like a real model folder)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast  # type: ignore[attr-defined]

    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(_vocab()) + "\n")
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    tokenizer = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tokenizer.save_pretrained(str(folder))
    config = BertConfig(
        vocab_size=len(_vocab()),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(str(folder))
    return folder


def make_tiny_llama(folder: Path, init_range: float = 0.02) -> Path:
    """A 2-layer Llama from a config with SmolLM2's real tokenizer and chat template
    (the packaged model's, converted once), for seconds-long causal-LM runs.
    ``init_range`` is the weights' init std: at the default its 32-wide tied
    embeddings cannot make any token likely; 0.5 lets LoRA memorise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedlora.models.loading import load_tokenizer
    from fedlora.models.packaged_lm import packaged_lm_path

    tokenizer = load_tokenizer(packaged_lm_path())
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=init_range,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
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


def tiny_run_config(
    model_dir: Path | str, data: Path | str, run_dir: Path | str, **extra: Any
) -> dict[str, Any]:
    """Run-config overrides for a seconds-long federated run of the tiny model."""
    return {
        "model-path": str(model_dir),
        "dataset": "file",
        "data-file": str(data),
        "partitioner": "iid",
        "num-server-rounds": 2,
        "lora-rank": 4,
        "lora-alpha": 8,
        "lora-dropout": 0.0,
        "batch-size": 8,
        "learning-rate": 0.01,
        "max-seq-length": 32,
        "min-train-nodes": 2,
        "run-dir": str(run_dir),
        "seed": 3,
        # Toy runs (hostile replies, OS-seeded DP noise) must run their rounds; the
        # divergence stop has its own test (tests/test_watch.py) and is on by default.
        "divergence-factor": 0.0,
        # ...and toy federations of 32-example sites cannot learn under DP: the
        # planner's refusal has its own test (tests/test_plan.py).
        "dp-plan": "warn",
        **extra,
    }
