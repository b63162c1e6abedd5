"""How this node trains for the run: its LoRA mode and rank, and whether it attacks.

The mode follows the run's ``strategy`` (each LoRA-aware strategy declares
one, :func:`fedlora.strategies.registry.client_mode`), so there is no second
key that could disagree with the server:

* ``standard`` (every Flower strategy, ``lora-exact``): train A, B and the
  head at ``lora-rank``; send them all.
* ``ffa`` (``ffa-lora``): A frozen at the shared seeded init; send B and head.
* ``hetero-rank``: train at this node's own rank — the node-config key
  ``lora-rank`` at a real site, ``sim-client-ranks`` by partition id
  (round-robin) in a simulation, else ``lora-rank``.

Attacks (``sim-malicious-fraction``) apply to simulated partitions only; a
node with its own ``data-path`` never attacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import Context

from fedlora.config import RunConfig
from fedlora.errors import ConfigError
from fedlora.protocol import (
    KEY_LORA_RANK,
    MODE_FFA,
    MODE_HETERO,
    MODE_STANDARD,
    NODE_DATA_PATH,
    NODE_NUM_PARTITIONS,
    NODE_PARTITION_ID,
    client_mode,
)
from fedlora.simulations.attacks import malicious_partitions


@dataclass(frozen=True)
class NodeMode:
    """This node's way of training in this run."""

    mode: str
    rank: int
    attack: str | None  # the simulated attack this partition mounts, if any

    @property
    def trains_a(self) -> bool:
        """Whether LoRA A factors train (not under FFA-LoRA)."""
        return self.mode != MODE_FFA


def node_mode(cfg: RunConfig, context: Context) -> NodeMode:
    """Mode, rank and attack of this node for the run ``cfg``.

    Raises
    ------
    ConfigError
        If the node's ``lora-rank`` is not a positive integer, or the mode
        cannot be combined with central DP (whose clipping assumes the
        standard payload).
    """
    mode = client_mode(cfg.strategy)
    if mode != MODE_STANDARD and cfg.privacy.dp_mode.startswith("central"):
        raise ConfigError(
            f"strategy={cfg.strategy} sends a non-standard update, which "
            f"dp-mode={cfg.privacy.dp_mode} cannot clip; use dp-mode=local or strategy=fedavg"
        )
    return NodeMode(mode, _rank(cfg, context, mode), _attack(cfg, context))


def _rank(cfg: RunConfig, context: Context, mode: str) -> int:
    if mode != MODE_HETERO:
        return cfg.lora.rank
    node = context.node_config
    if KEY_LORA_RANK in node:
        value = node[KEY_LORA_RANK]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"node config lora-rank={value!r} is not an integer >= 1; start the node "
                'with --node-config "lora-rank=8"'
            )
        return value
    ranks = cfg.client_ranks
    if ranks and NODE_PARTITION_ID in node:
        return ranks[int(node[NODE_PARTITION_ID]) % len(ranks)]  # type: ignore[arg-type]
    return cfg.lora.rank


def _attack(cfg: RunConfig, context: Context) -> str | None:
    node = context.node_config
    if cfg.sim_malicious_fraction <= 0 or NODE_DATA_PATH in node or NODE_PARTITION_ID not in node:
        return None
    pid, n = int(node[NODE_PARTITION_ID]), int(node[NODE_NUM_PARTITIONS])  # type: ignore[arg-type]
    return (
        cfg.sim_attack
        if pid in malicious_partitions(cfg.seed, n, cfg.sim_malicious_fraction)
        else None
    )
