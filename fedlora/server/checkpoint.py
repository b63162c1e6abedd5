"""Round checkpoints the server can resume from after a crash.

Each completed round writes ``checkpoint/round-NNNNNN/`` (global adapter as
``adapter.npz`` and the strategy object as ``strategy.pkl``: momentum, Adam
moments, DP accountants, adaptive clip norms all live there), then
atomically replaces ``checkpoint/state.json`` to point at it. ``state.json``
is the commit marker: a crash mid-write leaves the previous round intact.

Everything else a round depends on is derived, not stored: node sampling
from ``(seed, round)``, each client's shuffle and dropout from ``(seed,
round, site)``. So a resumed run replays the remaining rounds exactly as an
uninterrupted run would (tested), provided the run config is the same —
which :func:`load_checkpoint` checks through a hash of the config.

``strategy.pkl`` is a pickle written by this server into its own run
directory; never point ``--resume`` at a run directory from an untrusted
source.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.io import atomic_write_bytes, atomic_write_json
from fedlora.records import nonfinite_key
from fedlora.rundir import CHECKPOINT_DIR, CHECKPOINT_STATE_FILE

# Keys that may differ between the interrupted run and its resumption.
_RESUME_FREE_KEYS = {"resume", "run-dir", "round-timeout"}


class _StrategyPickler(pickle.Pickler):
    """Pickles strategies; Flower's RDP accountant goes by its own state_dict
    (it holds references to the dp-accounting modules, which pickle refuses)."""

    def reducer_override(self, obj: Any) -> Any:
        from flwr.serverapp import RdpAccountant

        if isinstance(obj, RdpAccountant):
            return _restore_accountant, (obj.state_dict(),)
        return NotImplemented


def _restore_accountant(state: dict[str, Any]) -> Any:
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

    c = state["config"]
    config = PrivacyConfig(
        target_delta=c["target_delta"],
        population_size=c["population_size"],
        neighboring_relation=NeighboringRelation(c["neighboring_relation"]),
        sampling_method=SamplingMethod(c["sampling_method"]),
        max_epsilon=c.get("max_epsilon"),
    )
    accountant = RdpAccountant(config, orders=tuple(state["orders"]))
    accountant.load_state_dict(state)
    return accountant


def dump_strategy(strategy: Any) -> bytes:
    """Serialise a strategy with everything it carries between rounds."""
    buffer = io.BytesIO()
    _StrategyPickler(buffer).dump(strategy)
    return buffer.getvalue()


def config_hash(cfg: RunConfig) -> str:
    """Hash of everything that decides the run's numbers."""
    flat = {k: v for k, v in cfg.to_flat().items() if k not in _RESUME_FREE_KEYS}
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


@dataclass
class Checkpoint:
    """A completed round's global adapter and strategy."""

    server_round: int
    state: dict[str, np.ndarray]
    strategy: Any


def save_checkpoint(
    run_dir: Path, cfg: RunConfig, server_round: int, state: dict[str, np.ndarray], strategy: Any
) -> Path:
    """Write round ``server_round`` and make it the one to resume from."""
    root = run_dir / CHECKPOINT_DIR
    folder = root / f"round-{server_round:06d}"
    buffer = io.BytesIO()
    np.savez(buffer, **state)  # type: ignore[arg-type]
    bad = nonfinite_key(state)
    if bad is not None:
        # A NaN must never become the state a run resumes from.
        raise ValueError(f"refusing to checkpoint round {server_round}: {bad!r} is not finite")
    adapter, pickled = buffer.getvalue(), dump_strategy(strategy)
    atomic_write_bytes(folder / "adapter.npz", adapter)
    atomic_write_bytes(folder / "strategy.pkl", pickled)
    atomic_write_json(
        root / CHECKPOINT_STATE_FILE,
        {
            "round": server_round,
            "folder": folder.name,
            "config_hash": config_hash(cfg),
            # Checked before the pickle is loaded: a changed file is not unpickled.
            "sha256": {
                "adapter.npz": hashlib.sha256(adapter).hexdigest(),
                "strategy.pkl": hashlib.sha256(pickled).hexdigest(),
            },
        },
    )
    # Also keep the latest adapter at a fixed path for tools and tests.
    atomic_write_bytes(root / "adapter.npz", buffer.getvalue())
    for old in root.glob("round-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def load_checkpoint(run_dir: Path, cfg: RunConfig) -> Checkpoint | None:
    """The last complete round, or None when the run has none yet."""
    root = run_dir / CHECKPOINT_DIR
    marker = root / CHECKPOINT_STATE_FILE
    if not marker.is_file():
        return None
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"cannot resume {run_dir}: checkpoint marker {marker} is unreadable ({err}); "
            "remove the checkpoint folder to start afresh"
        ) from None
    if meta.get("config_hash") != config_hash(cfg):
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoint was written with a different run "
            "config (only resume, run-dir and round-timeout may change). Use the same "
            "config, or a new run-dir to start afresh"
        )
    folder = root / str(meta.get("folder", ""))
    blobs: dict[str, bytes] = {}
    for name, digest in dict(meta.get("sha256", {})).items():
        path = folder / name
        try:
            blobs[name] = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"cannot resume {run_dir}: checkpoint file {path}: {err}") from None
        if hashlib.sha256(blobs[name]).hexdigest() != digest:
            raise ConfigError(
                f"cannot resume {run_dir}: checkpoint file {path} does not match the hash "
                f"recorded in {marker} (corrupt or changed); it is not loaded. Remove "
                f"{root} to start afresh"
            )
    if set(blobs) != {"adapter.npz", "strategy.pkl"}:
        raise ConfigError(
            f"cannot resume {run_dir}: checkpoint marker {marker} lists no file hashes "
            "(written by an older fedlora, or edited); remove the checkpoint to start afresh"
        )
    try:
        with np.load(io.BytesIO(blobs["adapter.npz"])) as data:
            state = {k: np.asarray(data[k]) for k in data.files}
        strategy = pickle.loads(blobs["strategy.pkl"])
    except Exception as err:  # a hash-checked file that still fails: name it
        raise ConfigError(
            f"cannot resume {run_dir}: checkpoint in {folder} cannot be loaded "
            f"({type(err).__name__}: {err})"
        ) from None
    return Checkpoint(int(meta["round"]), state, strategy)
