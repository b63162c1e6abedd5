"""Feature centering: the centred head, its statistics release, its accounting,
and a real federated run that measures the centre and exports it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlora import protocol
from fedlora.client.centering import feature_statistics
from fedlora.config import RunConfig
from fedlora.data.sources import load_table
from fedlora.errors import ConfigError, ModelError
from fedlora.models.adapter import CENTER_FILE, adapter_state, export_adapter, load_exported
from fedlora.models.batches import collate, encode
from fedlora.models.centering import clip_rows, combine, sum_clip
from fedlora.models.loading import build_model, load_tokenizer
from fedlora.models.pooling import pooled_features, set_feature_center
from fedlora.privacy.accounting import epsilon, steps_per_round
from fedlora.privacy.dpsgd import ReproducibleNoiseWarning
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.plan import site_sigma
from fedlora.privacy.releases import center_release, label_release
from fedlora.settings import LoraSettings
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0, pooling="mean")
IDS = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
MASK = (IDS != 0).long()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


def _encoded(model_dir: Path, data: Path, n: int = 12):  # type: ignore[no-untyped-def]
    table = load_table(data, "text", "label", None)
    return encode(load_tokenizer(str(model_dir)), table.subset(range(n)), 32)


def _one(data, i):  # type: ignore[no-untyped-def]
    batch = collate([data[i]], data.pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_centred_head_reads_the_vector_minus_the_centre(tiny_model_dir: Path) -> None:
    """logits = classifier(mean(h) - c); None restores the plain head; a centre
    of the wrong size or with NaN is refused, naming pooling-layers."""
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    plain = _logits(model)
    pooled = pooled_features(model, [{"input_ids": IDS, "attention_mask": MASK}])
    center = np.linspace(-1, 1, pooled.shape[1]).astype(np.float32)
    set_feature_center(model, center)
    head = model.base_model.model.classifier
    with torch.no_grad():
        want = head(pooled - torch.from_numpy(center))
    torch.testing.assert_close(_logits(model), want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(_logits(model), plain)
    # pooled_features reads the *uncentred* vector whatever the centre is
    again = pooled_features(model, [{"input_ids": IDS, "attention_mask": MASK}])
    torch.testing.assert_close(again, pooled)
    set_feature_center(model, None)
    torch.testing.assert_close(_logits(model), plain)
    with pytest.raises(ModelError, match="pooling-layers"):
        set_feature_center(model, center[:-1])
    with pytest.raises(ModelError, match="finite: False"):
        set_feature_center(model, np.full_like(center, np.nan))


def test_centring_needs_the_mean_pooler(tiny_model_dir: Path) -> None:
    model = build_model(tiny_model_dir, 3, replace(LORA, pooling="cls"), seed=0)
    with pytest.raises(ModelError, match="Set pooling=mean"):
        set_feature_center(model, np.zeros(16, dtype=np.float32))


def test_export_carries_the_centre_and_reloads_identical_logits(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    rng = np.random.default_rng(1)
    state = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    set_feature_center(model, rng.standard_normal(16).astype(np.float32))
    export_adapter(model, state, tmp_path / "adapter", ["a", "b", "c"], {"pooling": "mean"})
    assert (tmp_path / "adapter" / CENTER_FILE).is_file()
    again, _labels = load_exported(tmp_path / "adapter", str(tiny_model_dir))
    torch.testing.assert_close(_logits(again), _logits(model), atol=1e-6, rtol=1e-5)
    # a folder that says it was centred but lost its centre is refused
    meta = {"pooling": "mean", "feature_centering": True}
    set_feature_center(model, None)
    export_adapter(model, state, tmp_path / "adapter", ["a", "b", "c"], meta)
    assert not (tmp_path / "adapter" / CENTER_FILE).exists()  # the stale centre is gone
    with pytest.raises(ModelError, match="has no fedlora_feature_center"):
        load_exported(tmp_path / "adapter", str(tiny_model_dir))


def test_clip_rows_and_combine_by_hand() -> None:
    rows = torch.tensor([[3.0, 4.0], [0.3, 0.4]], dtype=torch.double)
    torch.testing.assert_close(
        clip_rows(rows, 1.0), torch.tensor([[0.6, 0.8], [0.3, 0.4]], dtype=torch.double)
    )
    # (1+3, 2+4) / (2+2)
    got = combine([np.array([1.0, 2.0]), np.array([3.0, 4.0])], [2.0, 2.0])
    np.testing.assert_allclose(got, [1.0, 1.5])
    # a noisy negative total count is floored at one
    np.testing.assert_allclose(combine([np.array([2.0])], [-3.0]), [2.0])


def test_statistics_without_dp_are_the_exact_sum(tiny_model_dir: Path, text_csv: Path) -> None:
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    data = _encoded(tiny_model_dir, text_csv)
    total, count = feature_statistics(model, data, RunConfig(lora=LORA))
    assert count == 12.0
    want = torch.zeros(16, dtype=torch.double)
    for i in range(12):
        # one example per batch: no padding, so this also checks the batched masking
        want += pooled_features(model, [_one(data, i)])[0].double()
    np.testing.assert_allclose(total, want.numpy(), rtol=1e-5, atol=1e-5)


def test_dp_statistics_are_recorded_first_and_noised_with_the_stated_std(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """Local DP: each release is one (sigma, 1, 1) ledger entry; over 400
    releases of 16 coordinates (6,400 draws) the noise std is within 5 % of
    sigma x sqrt(2) x clip (standard error ~0.9 %), its mean within 4 standard
    errors of the clipped sum, and the count's within 4 of the true count."""
    lora = replace(LORA, feature_centering=True, feature_center_clip=0.5)
    cfg = RunConfig(lora=lora)
    cfg = replace(cfg, privacy=replace(cfg.privacy, dp_mode="local", dp_noise_multiplier=1.0))
    model = build_model(tiny_model_dir, 3, lora, seed=0)
    data = _encoded(tiny_model_dir, text_csv)
    exact = clip_rows(
        pooled_features(
            model,
            [_one(data, i) for i in range(12)],
        ).double(),
        sum_clip(cfg),
    ).sum(0)
    assert sum_clip(cfg) == 0.5  # one pooled layer
    ledger = PrivacyLedger.open(tmp_path, "fed", "data", 1e-5, "rdp")
    g = torch.Generator().manual_seed(5)
    draws, counts = [], []
    with pytest.warns(ReproducibleNoiseWarning):
        for _ in range(400):
            total, count = feature_statistics(model, data, cfg, ledger, g)
            draws.append(total)
            counts.append(count)
    std = 10.0 * math.sqrt(2.0) * 0.5
    noise = np.stack(draws) - exact.numpy()
    assert abs(noise.std() / std - 1) < 0.05, noise.std()
    assert np.abs(noise.mean(0)).max() < 4 * std / math.sqrt(400)
    assert abs(np.mean(counts) - 12) < 4 * (std / 0.5) / math.sqrt(400)
    entries = [(r.noise_multiplier, r.sample_rate, r.steps) for r in ledger.rounds]
    assert entries == [(10.0, 1.0, 1)] * 400
    assert {r.server_round for r in ledger.rounds} == {0}


def test_target_epsilon_search_counts_the_centre_release() -> None:
    """With a target ε, the DP-SGD noise is found so that all rounds' steps,
    every round's label counts and the one centre release together spend at
    most the target (and within 0.01 of it)."""
    base = RunConfig(num_server_rounds=3)
    cfg = replace(
        base,
        lora=replace(base.lora, pooling="mean", feature_centering=True),
        train=replace(base.train, logit_adjustment=1.0),
        privacy=replace(base.privacy, dp_mode="local", dp_target_epsilon=8.0),
    )
    assert center_release(cfg) == [(10.0, 1.0, 1)]
    assert center_release(replace(cfg, privacy=replace(cfg.privacy, dp_mode="none"))) == []
    q, steps = steps_per_round(1000, 256, 1)
    sigma = site_sigma(cfg, 1000, 256, 1e-5)
    history = [(sigma, q, steps * 3), *label_release(cfg) * 3, *center_release(cfg)]
    spent = epsilon(history, 1e-5)
    assert 8.0 - 0.01 <= spent <= 8.0
    without = site_sigma(
        replace(cfg, lora=replace(cfg.lora, feature_centering=False)), 1000, 256, 1e-5
    )
    assert without < sigma  # the centre is not free


def test_config_refuses_centring_where_it_is_not_covered() -> None:
    base = RunConfig()
    lora = replace(base.lora, pooling="mean", feature_centering=True)
    with pytest.raises(ConfigError, match="feature-centering=true does not fit secagg=true"):
        RunConfig.from_flat(
            {
                **base.to_flat(),
                "pooling": "mean",
                "feature-centering": True,
                "secagg": True,
                "min-train-nodes": 3,
                "max-train-examples": 10,
            }
        )
    with pytest.raises(ConfigError, match="dp-mode=central-server-fixed"):
        replace(
            base,
            lora=lora,
            privacy=replace(base.privacy, dp_mode="central-server-fixed", dp_noise_multiplier=1.0),
        )
    with pytest.raises(ConfigError, match="'feature-centering'.*pooling=cls"):
        LoraSettings(pooling="cls", feature_centering=True)
    with pytest.raises(ConfigError, match="'feature-center-clip'"):
        LoraSettings(feature_center_clip=0.0)
    with pytest.raises(ConfigError, match="'dp-center-noise'"):
        replace(base.privacy, dp_center_noise=-1.0)


@pytest.mark.slow
@pytest.mark.integration
def test_federated_run_measures_the_exact_centre_and_exports_it(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """No DP: the centre the server measured by querying 3 nodes equals the
    mean sentence vector of the whole pool computed here directly; every round
    trains and evaluates with it, and the exported adapter carries it."""
    cfg = tiny_run_config(
        tiny_model_dir, text_csv, tmp_path, pooling="mean", **{"feature-centering": True}
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    center = np.load(tmp_path / "feature_center.npy")
    run = RunConfig.from_flat(json.loads((tmp_path / "config.json").read_text()))
    from fedlora.data.partition import simulation_split

    pool, _test = simulation_split(run.data, run.seed)
    model = build_model(tiny_model_dir, len(pool.labels), run.lora, run.seed)
    total, count = feature_statistics(
        model, encode(load_tokenizer(str(tiny_model_dir)), pool, 32), run
    )
    np.testing.assert_allclose(center, total / count, rtol=1e-4, atol=1e-5)
    assert (tmp_path / "adapter" / CENTER_FILE).is_file()
    meta = json.loads((tmp_path / "adapter" / "fedlora_metadata.json").read_text())
    assert meta["feature_centering"] is True


@pytest.mark.slow
@pytest.mark.integration
def test_centre_release_is_in_every_ledger_and_the_reported_epsilon(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    cfg = tiny_run_config(
        tiny_model_dir,
        text_csv,
        tmp_path,
        pooling="mean",
        **{
            "feature-centering": True,
            "dp-center-noise": 4.0,
            "dp-mode": "local",
            "dp-noise-multiplier": 1.0,
        },
    )
    status = simulate(cfg, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    history = [(4.0, 1.0, 1), (1.0, 0.25, 4), (1.0, 0.25, 4)]  # see test_privacy_integration
    for path in (tmp_path / "ledgers").glob("ledger-*.json"):
        entries = json.loads(path.read_text())["rounds"]
        got = [(r["noise_multiplier"], r["sample_rate"], r["steps"]) for r in entries]
        assert got == history, path
        assert entries[0]["server_round"] == 0
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert rounds[2]["extra"]["epsilon-max"] == pytest.approx(epsilon(history, 1e-5), rel=1e-6)
    assert epsilon(history, 1e-5) > epsilon(history[1:], 1e-5)


def test_centre_noise_norm_by_hand() -> None:
    """σ=10, R=5·√4=10, 10 nodes, 1536 features: 10·√2·10·√15360 / N —
    1.71 for Rotten Tomatoes' 10,246 examples, 10.3 for BBC News' 1,701
    (against a mean of norm ~9: the server warns on the second)."""
    from fedlora.server.centering import centre_noise_norm

    base = RunConfig()
    cfg = replace(base, lora=replace(base.lora, pooling="mean", pooling_layers=4))
    want = 10 * math.sqrt(2) * 10 * math.sqrt(10 * 1536)
    assert centre_noise_norm(cfg, 10, 1536, 10246) == pytest.approx(want / 10246)
    assert centre_noise_norm(cfg, 10, 1536, 10246) == pytest.approx(1.7106, abs=1e-3)
    assert centre_noise_norm(cfg, 10, 1536, 1701) == pytest.approx(10.304, abs=1e-2)


@pytest.mark.parametrize("case", ["centering off", "cap too small"])
def test_statistics_query_refuses_before_reading_data(
    case: str,
    flower_task: Any,
    tiny_model_dir: Path,
    text_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node answers the statistics query only for a run that centres, and
    only if the release fits its cap; either refusal comes before any data
    is read and leaves the ledger untouched."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from fedlora.client import app as client_app
    from fedlora.client.private import dataset_identity
    from fedlora.protocol import QUERY_FEATURE_STATS

    flat = tiny_run_config(
        tiny_model_dir,
        text_csv,
        tmp_path,
        pooling="mean",
        **{
            "feature-centering": case != "centering off",
            "dp-mode": "local",
            "dp-noise-multiplier": 1.0,
            "dp-center-noise": 1.0,  # one full-batch step at σ=1: far above ε=1
            "sim-epsilon-cap": 1.0,
            "sim-ledger-dir": str(tmp_path / "ledgers"),
        },
    )
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config={},
    )

    def no_reading(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("data was read although the node refuses")

    monkeypatch.setattr(client_app, "prepare", no_reading)
    from fedlora.client import prepare as client_prepare

    monkeypatch.setattr(client_prepare, "local_dataset", no_reading)
    model = build_model(tiny_model_dir, 3, LORA, 3)
    arrays = ArrayRecord({k: Array(v) for k, v in adapter_state(model).items()})
    msg = Message(
        content=RecordDict({"arrays": arrays, "config": ConfigRecord({QUERY_FEATURE_STATS: 1})}),
        dst_node_id=7,
        message_type="query",
    )
    reply = client_app.query_handler(msg, context, flat)
    assert reply.has_error()
    if case == "centering off":
        assert "feature-centering is false" in reply.error.reason
    else:
        assert reply.error.code == protocol.ERROR_CODE_BUDGET
        assert "privacy budget exhausted" in reply.error.reason
        cfg = client_app.run_config_of(context, flat)
        ledger = PrivacyLedger.open(
            tmp_path / "ledgers", "fedlora", dataset_identity(cfg, context), 1e-5, "rdp"
        )
        assert ledger.history == []
