"""The smaller findings of issue 17, one test each (each failed before the fix)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlora.cli.common import parse_overrides
from fedlora.cli.ops import app as ops_app
from fedlora.config import RunConfig
from fedlora.data.partition import client_partition
from fedlora.data.sources import load_table
from fedlora.errors import ConfigError, DataError
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.simulations.tiny import LABELS, tiny_run_config


def test_reading_a_site_file_leaves_no_copy_in_the_datasets_cache(
    text_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    from fedlora.data.labels import LabelSpace

    data = load_table(str(text_csv), "text", "label", LabelSpace.of(LABELS))
    assert len(data) > 0
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert not [p for p in left if p.suffix == ".arrow"], left


def _cfg(tmp_path: Path, text_csv: Path, tiny_model_dir: Path) -> RunConfig:
    return RunConfig.from_flat(tiny_run_config(tiny_model_dir, text_csv, tmp_path))


def test_a_changed_checkpoint_is_named_and_not_unpickled(
    tmp_path: Path, text_csv: Path, tiny_model_dir: Path
) -> None:
    cfg = _cfg(tmp_path, text_csv, tiny_model_dir)
    state = {"a": np.ones((2, 2), np.float32)}
    folder = save_checkpoint(tmp_path, cfg, 1, state, {"strategy": 1})
    assert load_checkpoint(tmp_path, cfg) is not None
    (folder / "strategy.pkl").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ConfigError, match=r"strategy\.pkl does not match the hash"):
        load_checkpoint(tmp_path, cfg)


def test_a_non_finite_state_is_never_checkpointed_or_exported(
    tmp_path: Path, text_csv: Path, tiny_model_dir: Path
) -> None:
    from fedlora.models.adapter import adapter_state, export_adapter
    from fedlora.models.loading import build_model
    from fedlora.settings import LoraSettings

    cfg = _cfg(tmp_path, text_csv, tiny_model_dir)
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(tmp_path, cfg, 1, {"a": np.array([np.nan], np.float32)}, None)
    model = build_model(tiny_model_dir, 3, LoraSettings(rank=4, alpha=8, dropout=0.0), 3)
    state = adapter_state(model)
    name = next(iter(state))
    state[name] = np.full_like(state[name], np.nan)
    with pytest.raises(ValueError, match="refusing to export"):
        export_adapter(model, state, tmp_path / "adapter", list(LABELS))
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "exp.toml"
    bad.write_text("num-server-rounds = [\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_overrides([str(bad)])


@pytest.mark.parametrize(
    ("key", "value"), [("seed", -1), ("num-server-rounds", 10**9), ("max-reported-examples", 0)]
)
def test_out_of_range_run_settings_are_refused(key: str, value: int) -> None:
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_flat({key: value})


def test_more_clients_than_examples_is_a_data_error(text_csv: Path, tmp_path: Path) -> None:
    cfg = RunConfig.from_flat({"dataset": "file", "data-file": str(text_csv), "partitioner": "iid"})
    with pytest.raises(DataError, match="clients but only"):
        client_partition(cfg.data, cfg.seed, 0, 10_000)


@pytest.fixture
def creds(tmp_path: Path) -> Path:
    made = CliRunner().invoke(
        ops_app, ["certs", "--out", str(tmp_path / "c"), "--host", "localhost", "--node", "a"]
    )
    assert made.exit_code == 0, made.output
    return tmp_path / "c"


def _node(creds: Path, data: Path) -> Any:
    return CliRunner().invoke(
        ops_app,
        [
            "node",
            "--superlink",
            "127.0.0.1:1",
            "--ca",
            str(creds / "ca.crt"),
            "--key",
            str(creds / "nodes" / "a.key"),
            "--data-path",
            str(data),
            "--trust-any-app",
            "--print-command",
        ],
    )


def test_a_world_readable_node_key_is_refused(creds: Path, text_csv: Path) -> None:
    assert _node(creds, text_csv).exit_code == 0
    os.chmod(creds / "nodes" / "a.key", 0o644)
    result = _node(creds, text_csv)
    assert result.exit_code == 2 and "chmod 600" in result.output


def test_the_ca_file_is_parsed(creds: Path, text_csv: Path) -> None:
    (creds / "ca.crt").write_text("not a certificate\n")
    result = _node(creds, text_csv)
    assert result.exit_code == 2 and "not a PEM certificate" in result.output


class _Interrupting:
    """A grid whose first call is Ctrl-C (the operator stops the server)."""

    def get_node_ids(self) -> list[int]:
        raise KeyboardInterrupt


def test_ctrl_c_leaves_the_run_stopped_not_running(
    tmp_path: Path, text_csv: Path, tiny_model_dir: Path
) -> None:
    from fedlora.server.app import run_server

    flat = tiny_run_config(tiny_model_dir, text_csv, tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        run_server(_Interrupting(), flat)  # type: ignore[arg-type]
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["status"] == "stopped" and "interrupted" in status["reason"]
