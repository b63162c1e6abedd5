"""How this node trains for the run: its LoRA mode and rank (and, in simulations only, a tamper).

The mode follows the run's ``strategy`` (each LoRA-aware strategy declares
one, :func:`fedlora.protocol.client_mode`), so there is no second
key that could disagree with the server:

* ``standard`` (every Flower strategy, ``lora-exact``): train A, B and the
  head at ``lora-rank``; send them all.
* ``ffa`` (``ffa-lora``): A frozen at the shared seeded init; send B and head.
* ``hetero-rank``: train at this node's own rank — the node-config key
  ``lora-rank`` at a real site, ``sim-client-ranks`` by partition id
  (round-robin) in a simulation, else ``lora-rank``.

Attacks (``sim-malicious-fraction``) are not here: the simulation engine
installs them as a :class:`Tamper` on its virtual nodes
(:class:`fedlora.simulations.attacks.Adversary`). A site's node runs the
ClientApp that ``fedlora node`` / ``flower-supernode`` load, which has none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from flwr.app import Context

from fedlora.config import RunConfig
from fedlora.data.sources import TextDataset
from fedlora.errors import ConfigError
from fedlora.protocol import (
    KEY_LORA_RANK,
    MODE_FFA,
    MODE_HETERO,
    MODE_STANDARD,
    NODE_PARTITION_ID,
    client_mode,
)
from fedlora.records import State


@dataclass(frozen=True)
class NodeMode:
    """This node's way of training in this run."""

    mode: str
    rank: int

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
    return NodeMode(mode, _rank(cfg, context, mode))


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


class Tamper(Protocol):
    """What a dishonest site would change, for measuring robust aggregation.

    Only the simulation engine installs one (``build_client_app(tamper=...)``
    in :mod:`fedlora.simulations.engine`); the node's own ClientApp has none,
    so no run config can make a hospital's node alter its data or update.
    """

    def data(self, cfg: RunConfig, context: Context, data: TextDataset) -> TextDataset:
        """The examples this node trains on (data poisoning)."""
        ...

    def update(
        self,
        cfg: RunConfig,
        context: Context,
        server_round: int,
        site: int,
        received: State,
        trained: State,
    ) -> State:
        """The adapter this node sends (model poisoning)."""
        ...
