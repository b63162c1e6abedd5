"""fedlora's ServerApp: what the operator's coordinator runs.

It builds the same frozen base and initial adapter every node builds, runs
the round loop with the configured strategy, evaluates the global adapter on
the server's held-out split every round, and leaves a run directory:

* ``config.json`` — the resolved run config;
* ``metrics.csv`` / ``metrics.json`` — one row per round (written each round);
* ``checkpoint/`` — the latest global adapter and round (atomic);
* ``adapter/`` — the final adapter in PEFT format plus the label list;
* ``feature_center.npy`` — with feature-centering, the federation's mean
  sentence vector (measured once; a resumed run reuses it);
* ``status.json`` — ``completed`` / ``stopped`` (with reason) / ``failed``.

``status.json`` exists because ``flwr run --stream`` exits 0 even when a run
failed; ``fedlora simulate`` and ``fedlora run`` read it to set their exit code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedlora.config import RunConfig
from fedlora.data.partition import simulation_split
from fedlora.io import atomic_write_bytes, atomic_write_json
from fedlora.models.adapter import adapter_state, load_adapter_state
from fedlora.models.loading import load_tokenizer, resolve_model_path
from fedlora.models.pooling import resolve_pooling, set_feature_center
from fedlora.models.task import get_task
from fedlora.privacy.central import central_epsilon, wrap_central
from fedlora.privacy.dpsgd import recipe_advice
from fedlora.protocol import (
    ARRAYS_KEY,
    KEY_FEATURE_CENTER,
    METRIC_ACCURACY,
    METRIC_LOSS,
    METRIC_NUM_EXAMPLES,
    MODE_FFA,
    client_mode,
)
from fedlora.records import arrays_to_state, is_lora_a, state_to_arrays
from fedlora.rundir import (
    ADAPTER_DIR,
    CLIENTS_JSON,
    CONFIG_FILE,
    FEATURE_CENTER_FILE,
    write_status,
)
from fedlora.server.centering import measure_feature_center
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.server.ensemble import EnsembleEvaluator
from fedlora.server.exchange import reply_metrics, wait_for_nodes
from fedlora.server.history import RoundRecord, RunHistory
from fedlora.server.loop import RoundOutcome, StrategyStep, TrainStep, progress_line, run_rounds
from fedlora.server.secagg import (
    SecAggSettings,
    SecAggStep,
    SecureAggregationFailed,
)
from fedlora.server.stops import RunStopped
from fedlora.server.validation import update_filter
from fedlora.strategies.registry import build_strategy

log = logging.getLogger("fedlora.server")


def _ensure_console_logging() -> None:
    logger = logging.getLogger("fedlora")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class GlobalEvaluator:
    """Evaluates a global adapter on the server's held-out split."""

    def __init__(self, cfg: RunConfig, model: Any):
        _pool, test = simulation_split(cfg.data, cfg.seed)
        self.model = model
        self.task = get_task()
        tokenizer = load_tokenizer(cfg.model_path or None)
        self.test = self.task.encode(tokenizer, test, cfg.train.max_seq_length)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_adapter_state(self.model, arrays_to_state(arrays))
        loss, acc, _n = self.task.evaluate(self.model, self.test)
        return {METRIC_LOSS: loss, METRIC_ACCURACY: acc}


def run_server(grid: Grid, flat_config: dict[str, Any]) -> str:
    """Run a whole federation; returns the final status."""
    _ensure_console_logging()
    cfg = RunConfig.from_flat(flat_config)
    run_dir = cfg.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, cfg.to_flat())
    write_status(run_dir, "running")
    history = RunHistory.load(run_dir) if cfg.resume else RunHistory(run_dir)
    try:
        _pool, test = simulation_split(cfg.data, cfg.seed)
        labels = list(test.labels.names)
        model = get_task().build_model(cfg.model_path or None, len(labels), cfg.lora, cfg.seed)
        arrays = state_to_arrays(adapter_state(model))
        strategy = build_strategy(
            cfg.strategy, cfg.strategy_options, cfg.fraction_evaluate, cfg.train.compression
        )
        if cfg.privacy.dp_mode == "local":
            for line in recipe_advice(cfg.train.optimizer, client_mode(cfg.strategy) != MODE_FFA):
                log.warning("%s", line)
        if cfg.privacy.dp_mode.startswith("central"):
            population = len(wait_for_nodes(grid, cfg.min_train_nodes, cfg.round_timeout))
            per_round = max(math.ceil(cfg.fraction_train * population), cfg.min_train_nodes)
            strategy = wrap_central(
                strategy,
                cfg.privacy.dp_mode,
                cfg.privacy.dp_noise_multiplier,
                cfg.privacy.dp_max_grad_norm,
                per_round,
                population,
                cfg.privacy.dp_delta,
            )
        evaluator = GlobalEvaluator(cfg, model)
        first_round = 1
        checkpoint = load_checkpoint(run_dir, cfg) if cfg.resume else None
        if checkpoint is not None:
            arrays = state_to_arrays(checkpoint.state)
            strategy = checkpoint.strategy
            first_round = checkpoint.server_round + 1
            history.truncate(checkpoint.server_round)
            log.info("resuming %s after round %d", run_dir, checkpoint.server_round)
        else:
            initial = evaluator(0, arrays)
            history.add(
                RoundRecord(
                    round=0,
                    global_loss=initial[METRIC_LOSS],
                    global_accuracy=initial[METRIC_ACCURACY],
                )
            )
            log.info(
                "[round 0/%d] global acc %.3f · loss %.3f (before training)",
                cfg.num_server_rounds,
                initial[METRIC_ACCURACY],
                initial[METRIC_LOSS],
            )
        latest = {"arrays": arrays}

        clients = ClientLog(run_dir, keep_until=first_round - 1 if cfg.resume else 0)
        ensemble = EnsembleEvaluator(model, evaluator.test, cfg.ensemble, cfg.ensemble_size)

        def on_round(outcome: RoundOutcome) -> None:
            latest["arrays"] = outcome.arrays
            record = _record(outcome)
            record.extra.update(clients.add(outcome))
            site_states = (
                [arrays_to_state(m.content.array_records[ARRAYS_KEY]) for m in outcome.replies]
                if cfg.ensemble == "sites"
                else []
            )
            record.extra.update(ensemble(arrays_to_state(outcome.arrays), site_states))
            central_eps = central_epsilon(strategy)
            if central_eps is not None:
                record.extra["epsilon-user-level"] = central_eps
            history.add(record)
            save_checkpoint(
                run_dir, cfg, outcome.server_round, arrays_to_state(outcome.arrays), strategy
            )
            log.info("%s", progress_line(outcome, cfg.num_server_rounds))

        status, reason = "completed", ""
        round_config: dict[str, Any] = {}
        try:
            if cfg.lora.feature_centering:
                center = feature_center(grid, arrays, cfg, run_dir)
                set_feature_center(model, center)
                round_config[KEY_FEATURE_CENTER] = [float(v) for v in center]
            step = train_step(grid, cfg, arrays, strategy, round_config)
            run_rounds(step, grid, cfg, arrays, evaluator, on_round, first_round)
        except (RunStopped, SecureAggregationFailed) as stop:
            status, reason = "stopped", str(stop)
            log.warning("run stopped: %s", reason)
        final = latest["arrays"]
        metadata = {
            "rounds_completed": max((r.round for r in history.records), default=0),
            "strategy": cfg.strategy,
            "seed": cfg.seed,
            "base_model": str(cfg.model_path or "all-MiniLM-L6-v2 (packaged)"),
            "pooling": resolve_pooling(
                resolve_model_path(cfg.model_path or None), cfg.lora.pooling
            ),
            "pooling_layers": cfg.lora.pooling_layers,
            "feature_centering": cfg.lora.feature_centering,
            "differential_privacy": _dp_metadata(cfg, history, strategy),
            "status": status,
        }
        get_task().export(model, arrays_to_state(final), run_dir / ADAPTER_DIR, labels, metadata)
        write_status(run_dir, status, reason, rounds_completed=metadata["rounds_completed"])
        return status
    except KeyboardInterrupt:
        # Ctrl-C: the run dir says so, and the last checkpoint stays resumable.
        write_status(run_dir, "stopped", "interrupted (Ctrl-C); resume with resume=true")
        raise
    except Exception as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise


def feature_center(grid: Grid, arrays: ArrayRecord, cfg: RunConfig, run_dir: Path) -> np.ndarray:
    """The run's feature centre: measured once by querying the nodes, then kept
    in ``<run-dir>/feature_center.npy`` so a resumed run reuses it instead of
    asking the nodes to spend privacy on it again."""
    path = run_dir / FEATURE_CENTER_FILE
    if cfg.resume and path.is_file():
        log.info("reusing the feature centre in %s", path)
        return np.asarray(np.load(path), dtype=np.float32)
    center = measure_feature_center(grid, arrays, cfg)
    buffer = io.BytesIO()
    np.save(buffer, center)
    atomic_write_bytes(path, buffer.getvalue())
    return center


def train_step(
    grid: Grid, cfg: RunConfig, arrays: ArrayRecord, strategy: Strategy, config: dict[str, Any]
) -> TrainStep:
    """The run's train step: SecAgg+ (FedAvg over the masked sum) or the strategy's.

    Under ``strategy=ffa-lora`` with SecAgg+ nodes send a zero update for the
    frozen A factors and the server keeps A bit-for-bit (FFA's exact mean of B).
    """
    if not cfg.secagg:
        update_gate = update_filter(cfg, arrays_to_state(arrays), strategy)
        return StrategyStep(strategy, grid, cfg, arrays, config, update_gate)
    settings = SecAggSettings(
        clipping_range=cfg.secagg_clipping_range,
        max_weight=cfg.secagg_max_weight or float(cfg.train.max_train_examples),
        timeout=cfg.round_timeout,
    )
    ffa = client_mode(cfg.strategy) == MODE_FFA
    return SecAggStep(
        grid,
        settings,
        cfg.num_server_rounds,
        min_nodes=cfg.min_train_nodes,
        train_config=config,
        frozen=[k for k in arrays if is_lora_a(k)] if ffa else [],
    )


class ClientLog:
    """Per-client metrics of every round in ``clients.json`` (for spread plots).

    Format: a JSON list of ``{"round", "site", "accuracy", "loss",
    "num_examples", ...}`` rows, one per client reply, including ``epsilon``
    when local DP is on.
    """

    def __init__(self, run_dir: Path, keep_until: int = 0):
        self.path = run_dir / CLIENTS_JSON
        old = json.loads(self.path.read_text()) if keep_until and self.path.is_file() else []
        self.rows: list[dict[str, Any]] = [r for r in old if r["round"] <= keep_until]

    def add(self, outcome: RoundOutcome) -> dict[str, float]:
        """Append this round's rows; returns summary metrics (ε max/mean)."""
        epsilons = []
        for site, msg in zip(outcome.reply_sites, outcome.replies, strict=True):
            m = reply_metrics(msg)
            row = {"round": outcome.server_round, "site": site, **m}
            row["num_examples"] = row.pop(METRIC_NUM_EXAMPLES, 0)
            self.rows.append(row)
            if "epsilon" in m:
                epsilons.append(m["epsilon"])
        atomic_write_json(self.path, self.rows)
        if not epsilons:
            return {}
        return {"epsilon-max": max(epsilons), "epsilon-mean": sum(epsilons) / len(epsilons)}


def _dp_metadata(cfg: RunConfig, history: RunHistory, strategy: Any) -> dict[str, Any]:
    """What an adapter's reader needs to know about its privacy."""
    p = cfg.privacy
    if p.dp_mode == "none":
        return {"mechanism": "none"}
    eps = [r.extra for r in history.records if r.extra]
    if p.dp_mode == "local":
        return {
            "mechanism": "local DP-SGD (Opacus), per-example clipping at each node",
            "max_grad_norm": p.dp_max_grad_norm,
            "noise_multiplier": p.dp_noise_multiplier or "derived from target epsilon",
            "target_epsilon_per_client": p.dp_target_epsilon or None,
            "accountant": p.dp_accountant,
            # Logit adjustment releases noisy label counts each round (accounted).
            "label_count_noise": p.dp_label_noise if cfg.train.logit_adjustment > 0 else None,
            "delta": "set by each node (node config)",
            "epsilon_spent_max_over_clients": max(
                (e.get("epsilon-max", 0.0) for e in eps), default=None
            ),
        }
    return {
        "mechanism": f"central user-level DP ({p.dp_mode}, Flower DP wrapper)",
        "clipping_norm": p.dp_max_grad_norm,
        "noise_multiplier": p.dp_noise_multiplier,
        "delta": p.dp_delta,
        "epsilon_user_level": central_epsilon(strategy),
        "accounting": "RDP, no sampling amplification"
        if p.dp_mode.endswith("fixed")
        else "not accounted (adaptive clipping)",
    }


def _record(outcome: RoundOutcome) -> RoundRecord:
    g, t, e = outcome.global_metrics, outcome.train_metrics, outcome.eval_metrics
    extra = {k: v for k, v in t.items() if k not in (METRIC_LOSS, METRIC_ACCURACY)}
    return RoundRecord(
        round=outcome.server_round,
        global_loss=g.get(METRIC_LOSS),
        global_accuracy=g.get(METRIC_ACCURACY),
        train_loss=t.get(METRIC_LOSS),
        train_accuracy=t.get(METRIC_ACCURACY),
        federated_loss=e.get(METRIC_LOSS),
        federated_accuracy=e.get(METRIC_ACCURACY),
        clients_sampled=outcome.sampled,
        clients_ok=outcome.ok,
        clients_failed=len(outcome.failures),
        bytes_uploaded=outcome.bytes_uploaded,
        seconds=round(outcome.seconds, 3),
        extra=extra,
        failures=outcome.failures,
    )


def build_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is ``context.run_config`` plus ``overrides``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        flat = {**dict(context.run_config), **(overrides or {})}
        status = run_server(grid, flat)
        if status == "failed":  # pragma: no cover - run_server raises instead
            raise RuntimeError("run failed")

    return server_app


app = build_server_app()
