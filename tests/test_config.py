"""Config validation: typed once, errors name the key, the value and what is allowed."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedlora.config import DEFAULTS, RunConfig
from fedlora.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_app_config_equals_python_defaults() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_flat_round_trip_and_typed_groups() -> None:
    cfg = RunConfig.from_flat({"lora-rank": 4, "lora-target-modules": "query, key ,value"})
    assert cfg.lora.rank == 4
    assert cfg.lora.target_modules == ("query", "key", "value")
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("lora-rank", 0, "'lora-rank' has value 0"),
        (
            "learning-rate",
            5.0,
            "'learning-rate' has value 5.0; allowed: 0 < x < 1 for optimizer=adamw",
        ),
        ("optimizer", "adam", "'optimizer' has value 'adam'; allowed: adamw, sgd"),
        ("momentum", 0.9, "'momentum' has value 0.9; allowed: 0 unless optimizer=sgd"),
        ("pooling", "max", "'pooling' has value 'max'; allowed: auto, cls, mean"),
        ("fraction-train", 0.0, "'fraction-train'"),
        ("batch-size", "many", "'batch-size' has value 'many'; allowed: a int"),
        ("test-fraction", 1.0, "'test-fraction'"),
        ("lora-rank", 2.5, "'lora-rank' has value 2.5"),
        ("local-epochs", True, "'local-epochs' has value True"),
    ],
)
def test_bad_values_name_key_value_and_allowed(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        RunConfig.from_flat({key: value})


def test_sgd_takes_large_rates_and_momentum() -> None:
    cfg = RunConfig.from_flat(
        {"optimizer": "sgd", "learning-rate": 2.0, "momentum": 0.9, "pooling": "mean"}
    )
    assert (cfg.train.optimizer, cfg.train.learning_rate, cfg.train.momentum) == ("sgd", 2.0, 0.9)
    assert cfg.lora.pooling == "mean" and cfg.to_flat()["pooling"] == "mean"


def test_unknown_key_lists_known_keys() -> None:
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'.*learning-rate"):
        RunConfig.from_flat({"learning_rate": 0.01})


def test_file_dataset_needs_data_file() -> None:
    with pytest.raises(ConfigError, match="dataset='file' needs data-file"):
        RunConfig.from_flat({"dataset": "file"})


def test_config_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        RunConfig.from_flat({"seed": "x"})
