"""The causal LM's canary audit: planting, exposure by hand, and extraction after memorisation."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from lm_training import fit_full_batch

from fedlora.data.catalog import load_demo
from fedlora.models.batches import collate
from fedlora.models.causal_lm import build_causal_lm, encode_instructions
from fedlora.models.loading import load_tokenizer
from fedlora.settings import LoraSettings
from fedlora.simulations.canaries import (
    REFERENCES,
    exposure,
    make_canaries,
    score_canaries,
    with_canaries,
)
from fedlora.simulations.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # init std 0.5: at the default 0.02 its tied 32-wide embeddings cannot make
    # any token likely, so nothing could be memorised (loss stays at ~10.8)
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), init_range=0.5)


@pytest.fixture(scope="module")
def drug_rows() -> Any:
    return load_demo("drug-sentiment").subset(range(6))


def test_exposure_by_hand() -> None:
    # likelier than all 3 references: rank 1, log2(4 / 1) = 2 bits
    assert exposure(-1.0, [-5.0, -3.0, -2.0]) == 2.0
    # two references at least as likely: rank 3, log2(4 / 3)
    assert exposure(-3.0, [-5.0, -3.0, -2.0]) == pytest.approx(math.log2(4 / 3))
    # the least likely of all: rank 4, 0 bits
    assert exposure(-9.0, [-5.0, -3.0, -2.0]) == 0.0


def test_canaries_are_seeded_distinct_and_spread_over_sites(drug_rows: Any) -> None:
    planted, held_out = make_canaries(7, 20, 3)
    assert (planted, held_out) == make_canaries(7, 20, 3)
    assert make_canaries(8, 20, 3)[0] != planted
    names = [c.name for c in planted + held_out]
    assert len(set(names)) == 40
    assert [c.site for c in planted] == [i % 3 for i in range(20)]
    assert {c.site for c in held_out} == {-1}
    assert all(len(c.secret) == 9 and c.secret[4] == "-" for c in planted)
    # planting: label answers become their names, each canary `repeats` times
    mine = [c for c in planted if c.site == 1]
    data = with_canaries(drug_rows, mine, 3)
    assert len(data) == len(drug_rows) + 3 * len(mine)
    assert data.responses[: len(drug_rows)] == tuple(
        drug_rows.labels.names[y] for y in drug_rows.label_ids
    )
    assert data.responses.count(mine[0].response()) == 3
    assert mine[0].secret in data.responses[len(drug_rows)]


def test_a_canary_repeated_in_training_is_extracted_and_a_held_out_one_is_not(
    tiny_folder: Path, drug_rows: Any
) -> None:
    """Non-private LoRA on the tiny Llama, the canary 16 times beside 2 reviews:
    memorised (greedy decoding writes the secret, exposure at its maximum),
    while a canary it never saw stays unexposed."""
    planted, held_out = make_canaries(3, 1, 1)
    data = with_canaries(drug_rows.subset(range(2)), planted, 16)
    tokenizer = load_tokenizer(tiny_folder)
    lora = LoraSettings(rank=16, alpha=32.0, dropout=0.0)  # measured: extracted by step 300
    model = build_causal_lm(tiny_folder, 3, lora, 0)
    before = score_canaries(model, tokenizer, drug_rows, planted, 0, progress=lambda _s: None)
    assert not before[0]["extracted"]
    enc = encode_instructions(tokenizer, data, 128)
    fit_full_batch(model, collate([enc[i] for i in range(len(enc))], enc.pad_id), 5e-3, 300)
    rows = score_canaries(
        model, tokenizer, drug_rows, [*planted, *held_out], 0, progress=lambda _s: None
    )
    assert rows[0]["extracted"], rows[0]
    assert rows[0]["exposure"] == pytest.approx(math.log2(REFERENCES + 1))
    assert rows[0]["gain_over_base"] > 5.0  # nats: the adapter, not the base, knows it
    assert not rows[1]["extracted"]
    assert rows[1]["exposure"] < rows[0]["exposure"]
