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
import logging
import math
import sys
from dataclasses import asdict, dataclass
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
from fedlora.models.lm_eval import chosen_metrics
from fedlora.models.loading import load_tokenizer
from fedlora.models.pooling import set_feature_center
from fedlora.models.task import get_task
from fedlora.privacy.central import central_epsilon, wrap_central
from fedlora.privacy.settings import recipe_advice
from fedlora.protocol import (
    ARRAYS_KEY,
    KEY_FEATURE_CENTER,
    METRIC_ACCURACY,
    METRIC_LOSS,
    MODE_FFA,
    client_mode,
)
from fedlora.records import arrays_to_state, is_lora_a, state_to_arrays
from fedlora.rundir import (
    ADAPTER_DIR,
    CONFIG_FILE,
    FEATURE_CENTER_FILE,
    write_status,
)
from fedlora.server.centering import measure_feature_center
from fedlora.server.checkpoint import load_checkpoint, save_checkpoint
from fedlora.server.ensemble import EnsembleEvaluator
from fedlora.server.exchange import wait_for_nodes
from fedlora.server.history import RoundRecord, RunHistory, round_line
from fedlora.server.loop import (
    RoundHook,
    RoundOutcome,
    StrategyStep,
    TrainStep,
    run_rounds,
)
from fedlora.server.report import ClientLog, dp_metadata, global_extras, round_record
from fedlora.server.secagg import SecAggStep
from fedlora.server.secagg_flower import SecAggSettings, SecureAggregationFailed
from fedlora.server.stops import RunStopped
from fedlora.server.validation import update_filter
from fedlora.server.watch import BestRound, DivergenceWatch, majority_share
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
        self.task = get_task(cfg.task)
        tokenizer = load_tokenizer(self.task.folder(cfg.model_path or None))
        self.test = self.task.encode(tokenizer, test, cfg.train.max_seq_length)
        self.tokenizer, self.lm, self.labels = tokenizer, cfg.lm, list(test.labels.names)
        #: the majority-label share of the examples scored each round (the collapse
        #: check); None for free text. A causal LM scores the first eval-max-examples.
        scored = test.label_ids
        if self.task.metrics is not None and cfg.lm.eval_max_examples:
            scored = scored[: cfg.lm.eval_max_examples]
        self.majority = majority_share(scored) if test.label_style else None
        if self.task.metrics is not None:  # a bad lm-metrics fails here, before round 1
            chosen_metrics(cfg.lm, test.label_style)

    def __call__(self, server_round: int, arrays: ArrayRecord) -> dict[str, float]:
        load_adapter_state(self.model, arrays_to_state(arrays))
        if self.task.metrics is not None:
            return self.task.metrics(self.model, self.test, self.tokenizer, self.lm, self.labels)
        loss, acc, _n = self.task.evaluate(self.model, self.test)
        return {METRIC_LOSS: loss, METRIC_ACCURACY: acc}


@dataclass
class _Run:
    """What the steps of one run share."""

    cfg: RunConfig
    run_dir: Path
    history: RunHistory
    model: Any
    labels: list[str]
    arrays: ArrayRecord
    strategy: Strategy
    evaluator: GlobalEvaluator
    best: BestRound
    first_round: int = 1


def run_server(grid: Grid, flat_config: dict[str, Any]) -> str:
    """Run a whole federation; returns the final status.

    The steps, in order: :func:`_set_up` (model, strategy, central DP),
    :func:`_resume_or_start` (checkpoint or round 0), :func:`_train` (feature
    centre, then the one round loop), :func:`_export` (adapter + status).
    """
    _ensure_console_logging()
    cfg = RunConfig.from_flat(flat_config)
    run_dir = cfg.run_path
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / CONFIG_FILE, cfg.to_flat())
    write_status(run_dir, "running")
    history = RunHistory.load(run_dir) if cfg.resume else RunHistory(run_dir)
    try:
        run = _set_up(grid, cfg, run_dir, history)
        _resume_or_start(run)
        status, reason, final = _train(grid, run)
        return _export(run, final, status, reason)
    except KeyboardInterrupt:
        # Ctrl-C: the run dir says so, and the last checkpoint stays resumable.
        write_status(run_dir, "stopped", "interrupted (Ctrl-C); resume with resume=true")
        raise
    except Exception as exc:
        write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}")
        raise


def _set_up(grid: Grid, cfg: RunConfig, run_dir: Path, history: RunHistory) -> _Run:
    """The frozen base and initial adapter every node builds, and the strategy."""
    _pool, test = simulation_split(cfg.data, cfg.seed)
    labels = list(test.labels.names)
    task = get_task(cfg.task)
    folder = task.folder(cfg.model_path or None)
    model = task.build_model(folder, len(labels), cfg.lora, cfg.seed)
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
    w = cfg.watch
    watch = DivergenceWatch(w.divergence_factor, w.divergence_patience, evaluator.majority)
    best = BestRound(run_dir, watch)
    return _Run(cfg, run_dir, history, model, labels, arrays, strategy, evaluator, best)


def _resume_or_start(run: _Run) -> None:
    """Continue from the checkpoint (``resume=true``), or evaluate round 0."""
    cfg = run.cfg
    checkpoint = load_checkpoint(run.run_dir, cfg) if cfg.resume else None
    if checkpoint is not None:
        run.arrays = state_to_arrays(checkpoint.state)
        run.strategy = checkpoint.strategy
        run.first_round = checkpoint.server_round + 1
        run.history.truncate(checkpoint.server_round)
        run.best.replay(
            [
                (r.round, r.global_accuracy or 0.0, r.global_loss or 0.0)
                for r in run.history.records
                if r.global_loss is not None
            ]
        )
        log.info("resuming %s after round %d", run.run_dir, checkpoint.server_round)
        return
    initial = run.evaluator(0, run.arrays)
    state = arrays_to_state(run.arrays)
    run.best.observe(0, initial[METRIC_ACCURACY], initial[METRIC_LOSS], state)
    record = RoundRecord(
        round=0,
        global_loss=initial[METRIC_LOSS],
        global_accuracy=initial[METRIC_ACCURACY],
        extra=global_extras(initial),
    )
    run.history.add(record)
    log.info("%s", round_line(asdict(record), cfg.num_server_rounds))


def _round_hook(run: _Run, latest: dict[str, ArrayRecord]) -> RoundHook:
    """What happens after every round: history, clients, ensembles, checkpoint, progress."""
    cfg = run.cfg
    clients = ClientLog(run.run_dir, keep_until=run.first_round - 1 if cfg.resume else 0)
    ensemble = EnsembleEvaluator(run.model, run.evaluator.test, cfg.ensemble, cfg.ensemble_size)

    def on_round(outcome: RoundOutcome) -> None:
        latest[ARRAYS_KEY] = outcome.arrays
        record = round_record(outcome)
        record.extra.update(clients.add(outcome))
        site_states = (
            [arrays_to_state(m.content.array_records[ARRAYS_KEY]) for m in outcome.replies]
            if cfg.ensemble == "sites"
            else []
        )
        state = arrays_to_state(outcome.arrays)  # decoded once for ensemble and checkpoint
        record.extra.update(ensemble(state, site_states))
        central_eps = central_epsilon(run.strategy)
        if central_eps is not None:
            record.extra["epsilon-user-level"] = central_eps
        run.history.add(record)
        save_checkpoint(run.run_dir, cfg, outcome.server_round, state, run.strategy)
        log.info("%s", round_line(asdict(record), cfg.num_server_rounds))
        g = outcome.global_metrics
        if METRIC_LOSS in g:  # the server's own held-out figures: no site data
            diverged = run.best.observe(
                outcome.server_round, g.get(METRIC_ACCURACY, 0.0), g[METRIC_LOSS], state
            )
            if diverged:
                raise RunStopped(diverged)

    return on_round


def _train(grid: Grid, run: _Run) -> tuple[str, str, ArrayRecord]:
    """The feature centre (if asked), then the rounds: (status, reason, final adapter)."""
    cfg = run.cfg
    latest = {ARRAYS_KEY: run.arrays}
    on_round = _round_hook(run, latest)
    round_config: dict[str, Any] = {}
    try:
        if cfg.lora.feature_centering:
            center = feature_center(grid, run.arrays, cfg, run.run_dir)
            set_feature_center(run.model, center)
            round_config[KEY_FEATURE_CENTER] = [float(v) for v in center]
        step = train_step(grid, cfg, run.arrays, run.strategy, round_config)
        run_rounds(step, grid, cfg, run.arrays, run.evaluator, on_round, run.first_round)
    except (RunStopped, SecureAggregationFailed) as stop:
        log.warning("run stopped: %s", stop)
        return "stopped", str(stop), latest[ARRAYS_KEY]
    return "completed", "", latest[ARRAYS_KEY]


def _export(run: _Run, final: ArrayRecord, status: str, reason: str) -> str:
    """The last good adapter in PEFT format with what its reader must know; the status."""
    cfg = run.cfg
    task = get_task(cfg.task)
    folder = task.folder(cfg.model_path or None)
    last_round = max((r.round for r in run.history.records), default=0)
    last = arrays_to_state(final)
    exported, state, why = run.best.choose(cfg.watch.export_round, last_round, last)
    metadata = {
        "task": cfg.task,
        "rounds_completed": last_round,
        "exported_round": exported,
        "exported_because": why,
        "strategy": cfg.strategy,
        "seed": cfg.seed,
        "base_model": str(folder),
        "max_seq_length": cfg.train.max_seq_length,
        "differential_privacy": dp_metadata(cfg, run.history, run.strategy),
        "status": status,
    }
    metadata.update(task.describe(folder, cfg.lora))  # how the base was used
    out = run.run_dir / ADAPTER_DIR
    task.export(run.model, state, out, run.labels, metadata)
    failed = sum(r.clients_failed for r in run.history.records)
    write_status(
        run.run_dir,
        status,
        reason,
        rounds_completed=last_round,
        exported_round=exported,
        clients_failed=failed,  # a crashed or OOM site is never silent (exit code 4)
    )
    return status


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
