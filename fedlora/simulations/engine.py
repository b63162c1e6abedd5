"""Run a federation of virtual clients on Flower's simulation engine (Ray).

The ServerApp and ClientApp are the very ones a deployment runs; only the
runtime differs. The engine is driven in-process so that fedlora can set the
process exit code from the run's recorded status (``flwr run --stream``
returns 0 even when a run failed) and so no SuperLink is involved that could
install runtime dependencies.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import DEFAULTS, RunConfig
from fedlora.errors import ConfigError

log = logging.getLogger("fedlora.simulation")


@dataclass(frozen=True)
class Resources:
    """Ray resources: per virtual client, and for the whole simulation."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    total_cpus: int | None = None
    total_gpus: int | None = None
    #: An existing Ray cluster (``HOST:PORT`` of its head) instead of a local Ray.
    ray_address: str | None = None

    def __post_init__(self) -> None:
        if self.num_cpus <= 0:
            raise ConfigError(f"num-cpus per client is {self.num_cpus}; use a value > 0")
        if not 0 <= self.num_gpus <= 1 and not float(self.num_gpus).is_integer():
            raise ConfigError(
                f"num-gpus per client is {self.num_gpus}; use a fraction in [0, 1] "
                "(0.25 -> four clients share a GPU) or a whole number"
            )
        host, _, port = (self.ray_address or "h:1").rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(
                f"ray-address is {self.ray_address!r}; give the head node's HOST:PORT "
                "(the address `ray start --head --port PORT` printed), e.g. 10.0.0.5:6379"
            )

    def backend_config(self) -> dict[str, Any]:
        """Flower's backend config for the Ray backend.

        With ``ray_address`` the engine attaches to that cluster: its nodes'
        CPUs and GPUs size the actor pool (Flower counts them per node), so
        no totals are passed (Ray refuses them when attaching)."""
        init: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": True,
        }
        if self.ray_address:
            init["address"] = self.ray_address
        else:
            init["num_cpus"] = self.total_cpus or os.cpu_count() or 1
            if self.total_gpus is not None:
                init["num_gpus"] = self.total_gpus
        return {
            "client_resources": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "init_args": init,
        }


def resolve_config(overrides: dict[str, Any]) -> RunConfig:
    """Defaults + overrides, validated (errors name the key)."""
    return RunConfig.from_flat({**DEFAULTS, **overrides})


def write_partitions(run_dir: Path, cfg: RunConfig, num_clients: int) -> Path:
    """``partitions.json``: what each virtual client holds (examples, label counts).

    The same split the clients load (:func:`fedlora.data.partition.client_partition`,
    same data settings and seed), computed once in the driver; a bad data
    setting fails here, before Ray starts.
    """
    from fedlora.data.partition import partition_summary
    from fedlora.io import atomic_write_json
    from fedlora.rundir import PARTITIONS_JSON

    rows = partition_summary(cfg.data, cfg.seed, num_clients)
    run_dir.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(run_dir / PARTITIONS_JSON, rows)


def simulate(
    overrides: dict[str, Any],
    num_clients: int,
    resources: Resources,
    verbose: bool = False,
    client_mods: list[Any] | None = None,
) -> dict[str, Any]:
    """Run the federation; returns the run's status record."""
    from flwr.simulation import run_simulation

    from fedlora.client.app import build_client_app
    from fedlora.rundir import status_of, write_status
    from fedlora.server.app import build_server_app
    from fedlora.simulations.attacks import Adversary
    from fedlora.simulations.placement import placement_mod

    if num_clients < 1:
        raise ConfigError(f"num-clients is {num_clients}; use >= 1")
    cfg = resolve_config(overrides)
    if cfg.min_train_nodes > num_clients:
        raise ConfigError(
            f"min-train-nodes={cfg.min_train_nodes} exceeds num-clients={num_clients}; "
            "lower min-train-nodes or add clients"
        )
    run_dir = Path(cfg.run_dir).resolve()
    write_partitions(run_dir, cfg, num_clients)
    from fedlora.simulations.planning import preflight

    total_cpus = resources.total_cpus or os.cpu_count() or 1
    concurrent = min(num_clients, max(1, int(total_cpus // resources.num_cpus)))
    refusal = preflight(cfg, num_clients, concurrent, run_dir)
    if refusal:  # before Ray starts: no site has spent anything
        write_status(run_dir, "stopped", refusal)
        return {**status_of(run_dir), "run_dir": str(run_dir)}
    flat = {**cfg.to_flat(), "run-dir": str(run_dir)}
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
        os.environ.setdefault("RAY_LOG_TO_STDERR", "0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            run_simulation(
                server_app=build_server_app(flat),
                # The simulated attacks are installed here, on virtual nodes only.
                client_app=build_client_app(
                    flat, [placement_mod(run_dir), *(client_mods or [])], tamper=Adversary()
                ),
                num_supernodes=num_clients,
                backend_config=resources.backend_config(),  # type: ignore[arg-type]
                verbose_logging=verbose,
            )
        except Exception as exc:
            status = status_of(run_dir)
            if status.get("status") in ("missing", "running"):
                run_dir.mkdir(parents=True, exist_ok=True)
                write_status(run_dir, "failed", f"{type(exc).__name__}: {exc}")
                status = status_of(run_dir)
            return {**status, "run_dir": str(run_dir)}
    status = status_of(run_dir)
    if status.get("status") in ("completed", "stopped"):
        from fedlora.simulations.report import write_reports

        write_reports(run_dir)
        if cfg.audit and status.get("status") == "completed":
            from fedlora.simulations.audit import audit_run, summary_line

            record = audit_run(run_dir, progress=log.warning)
            log.warning("privacy audit: %s", summary_line(record))
            if not record["passed"]:
                write_status(
                    run_dir,
                    "failed",
                    "privacy audit failed: " + "; ".join(record["failures"]),
                    **{k: v for k, v in status.items() if k not in ("status", "reason", "time")},
                )
                status = status_of(run_dir)
    return {**status, "run_dir": str(run_dir)}
