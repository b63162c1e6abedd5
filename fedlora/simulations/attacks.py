"""Poisoned clients, for measuring robust aggregation in simulations only.

Model poisoning by sign flipping and noise (as evaluated for Krum, Blanchard
et al., 2017, https://arxiv.org/abs/1703.02246, and the coordinate-wise
median / trimmed mean, Yin et al., 2018, https://arxiv.org/abs/1803.01498)
and data poisoning by label flipping (Tolpegin et al., 2020,
https://arxiv.org/abs/2007.08432).

Run config: ``sim-malicious-fraction`` of the partitions attack with
``sim-attack`` (``sign-flip``, ``scaled-noise``, ``label-flip``) at strength
``sim-attack-scale``. This exists only for simulations: a node with its own
``data-path`` (a real site) never attacks, whatever the run config says, so a
server's run config cannot make a hospital send garbage.

Which partitions attack is fixed by ``(seed, num-partitions)`` — a seeded
choice of ``round(fraction * n)`` of them — so a run reproduces and exactly
that many attack. Noise is drawn from ``(seed, round, partition)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Mapping

import numpy as np
from flwr.app import Context

from fedlora.config import RunConfig
from fedlora.data.sources import TextDataset
from fedlora.errors import ConfigError
from fedlora.protocol import NODE_DATA_PATH, NODE_NUM_PARTITIONS, NODE_PARTITION_ID
from fedlora.records import State
from fedlora.simulations.canaries import make_canaries, with_canaries

__all__ = ["Adversary", "flip_labels", "malicious_partitions", "partition_attack", "poison_update"]


def _seed(*parts: object) -> int:
    # sha256, not hash(): Python salts hash() per process.
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "big")


def malicious_partitions(seed: int, num_partitions: int, fraction: float) -> frozenset[int]:
    """The partition ids that attack: ``round(fraction * n)`` of them, seeded."""
    if not 0 <= fraction <= 1:
        raise ConfigError(f"sim-malicious-fraction is {fraction}; allowed: 0 <= x <= 1")
    count = math.floor(fraction * num_partitions + 0.5)
    rng = random.Random(_seed("fedlora-sim-malicious", seed, num_partitions))
    return frozenset(rng.sample(range(num_partitions), count))


def poison_update(
    received: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    attack: str,
    scale: float,
    seed: int,
    server_round: int,
    partition: int,
) -> dict[str, np.ndarray]:
    """The poisoned version of ``trained`` (same keys), built from its delta.

    ``sign-flip`` sends ``received - scale * delta``: the update pushed the
    other way, harder. ``scaled-noise`` sends ``received + noise`` with
    Gaussian noise of ``scale`` times the honest delta's RMS per tensor: an
    update of plausible size that carries nothing.
    """
    rng = np.random.default_rng(_seed("fedlora-sim-noise", seed, server_round, partition))
    out: dict[str, np.ndarray] = {}
    for key, value in trained.items():
        base = np.asarray(received[key], np.float32)
        delta = np.asarray(value, np.float32) - base
        if attack == "sign-flip":
            out[key] = base - scale * delta
        elif attack == "scaled-noise":
            rms = float(np.sqrt(np.mean(delta.astype(np.float64) ** 2))) if delta.size else 0.0
            noise = rng.standard_normal(delta.shape) * (scale * rms)
            out[key] = base + noise.astype(np.float32)
        else:
            raise ConfigError(
                f"sim-attack {attack!r} does not change updates; "
                "model poisoning is sign-flip or scaled-noise"
            )
    return out


def flip_labels(data: TextDataset) -> TextDataset:
    """Every label moved to the next class (``y -> (y + 1) mod K``): all wrong."""
    k = len(data.labels)
    return dataclasses.replace(
        data,
        label_ids=tuple((y + 1) % k for y in data.label_ids),
        source=f"{data.source} (labels flipped)",
    )


def simulated_partition(context: Context) -> tuple[int, int] | None:
    """(partition id, partitions) of a virtual node; None for a node with its own
    ``data-path`` (a real site), which no run config can make tamper."""
    node = context.node_config
    if NODE_DATA_PATH in node or NODE_PARTITION_ID not in node:
        return None
    return int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])  # type: ignore[arg-type]


def partition_attack(cfg: RunConfig, context: Context) -> str | None:
    """The attack this virtual node mounts in the run ``cfg``, or None
    (only simulated partitions attack)."""
    partition = simulated_partition(context)
    if cfg.sim_malicious_fraction <= 0 or partition is None:
        return None
    pid, n = partition
    chosen = malicious_partitions(cfg.seed, n, cfg.sim_malicious_fraction)
    return cfg.sim_attack if pid in chosen else None


class Adversary:
    """The simulated attacks as the ClientApp's tamper (:class:`fedlora.client.modes.Tamper`).

    The simulation engine installs it on its virtual nodes; it acts on the
    partitions :func:`partition_attack` picks and leaves the others alone.
    """

    def data(self, cfg: RunConfig, context: Context, data: TextDataset) -> TextDataset:
        """Label flipping for a ``label-flip`` partition; the audit's canaries
        (``audit-canaries``, :mod:`fedlora.simulations.canaries`) where planted."""
        if partition_attack(cfg, context) == "label-flip":
            data = flip_labels(data)
        partition = simulated_partition(context)
        if cfg.lm.audit_canaries <= 0 or partition is None:
            return data
        pid, n = partition
        planted, _held_out = make_canaries(cfg.seed, cfg.lm.audit_canaries, n)
        mine = [c for c in planted if c.site == pid]
        return with_canaries(data, mine, cfg.lm.audit_canary_repeats)

    def update(
        self,
        cfg: RunConfig,
        context: Context,
        server_round: int,
        site: int,
        received: State,
        trained: State,
    ) -> State:
        """Sign flipping or noise for a ``sign-flip`` / ``scaled-noise`` partition."""
        attack = partition_attack(cfg, context)
        if attack not in ("sign-flip", "scaled-noise"):
            return trained
        return poison_update(
            received, trained, attack, cfg.sim_attack_scale, cfg.seed, server_round, site
        )
