"""The feature centre, measured once before round 1 (``feature-centering``).

Every connected node is asked for the (clipped, under local DP noised and
accounted) sum and count of its sentence vectors; replies are checked
(exact arrays, sound headers, one finite count, one sum shape), combined
into the federation's mean vector, and kept in the run directory so a
resumed run does not ask the nodes to spend privacy on it again.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.models.centering import combine, sum_clip
from fedlora.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    KEY_FEATURE_COUNT,
    KEY_FEATURE_SUM,
    QUERY_FEATURE_STATS,
    STATS_RECORD,
)
from fedlora.server.exchange import SiteRegistry, split_replies, wait_for_nodes
from fedlora.server.gate import check_statistics_reply
from fedlora.server.stops import RunStopped

log = logging.getLogger("fedlora.server")


def measure_feature_center(grid: Grid, arrays: ArrayRecord, cfg: RunConfig) -> np.ndarray:
    """Ask every connected node for its sentence-vector sum and count; return
    the federation's mean vector (feature-centering, before round 1).

    Nodes that fail or refuse (budget, data) are left out and logged; fewer
    than ``min-train-nodes`` answers stop the run, as a round would.
    """
    nodes = wait_for_nodes(grid, cfg.min_train_nodes, cfg.round_timeout)
    sites = SiteRegistry()
    sites.refresh(grid, timeout=max(cfg.round_timeout, 60.0))
    content = RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: ConfigRecord({QUERY_FEATURE_STATS: 1})})
    messages = [
        Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
    ]
    replies = grid.send_and_receive(messages, timeout=max(cfg.round_timeout, 60.0))
    ok, failures = split_replies(replies, nodes, sites, sent=messages)
    ok = _checked_statistics(ok, sites, failures)
    for line in failures:
        log.warning("feature statistics: %s", line)
    if len(ok) < cfg.min_train_nodes:
        raise RunStopped(
            f"feature statistics: only {len(ok)} of {len(nodes)} nodes answered "
            f"(min-train-nodes={cfg.min_train_nodes}); failures: " + "; ".join(failures)
        )
    records = [m.content.array_records[STATS_RECORD] for m in ok]
    center = combine(
        [r[KEY_FEATURE_SUM].numpy() for r in records],
        [float(r[KEY_FEATURE_COUNT].numpy()[0]) for r in records],
    )
    norm = float(np.linalg.norm(center))
    log.info(
        "feature centre from %d node(s): norm %.3f over %d features", len(ok), norm, center.size
    )
    if cfg.privacy.dp_mode == "local":
        counts = sum(float(r[KEY_FEATURE_COUNT].numpy()[0]) for r in records)
        noise = centre_noise_norm(cfg, len(ok), center.size, counts)
        if noise > 0.5 * norm:
            log.warning(
                "feature centre is mostly noise: its expected noise norm %.2f is over half "
                "its norm %.2f (%d nodes, ~%d examples in all). A noisy centre can make the "
                "head worse than none: set feature-centering=false, or lower dp-center-noise "
                "or feature-center-clip",
                noise,
                norm,
                len(ok),
                int(counts),
            )
    return center


def _checked_statistics(
    replies: list[Message], sites: SiteRegistry, failures: list[str]
) -> list[Message]:
    """The replies whose statistics are sound, all with one sum shape; a line
    in ``failures`` for every other one."""
    keys = frozenset({KEY_FEATURE_SUM, KEY_FEATURE_COUNT})
    checked: list[tuple[Message, tuple[int, ...]]] = []
    for m in replies:
        try:
            reason = check_statistics_reply(m, STATS_RECORD, keys)
            record = m.content.array_records[STATS_RECORD]
            if reason is None and record[KEY_FEATURE_COUNT].shape != (1,):
                reason = "feature-count must hold one number"
        except Exception as exc:  # a reply no check foresaw: drop it, say why
            reason = f"reply could not be checked ({type(exc).__name__})"
        if reason is None:
            checked.append((m, tuple(record[KEY_FEATURE_SUM].shape)))
        else:
            failures.append(f"{sites.key(m.metadata.src_node_id)}: statistics rejected: {reason}")
    shapes = [shape for _m, shape in checked]
    # Sums of different lengths cannot be combined: keep the most common.
    common = max(set(shapes), key=shapes.count) if shapes else ()
    for m, shape in checked:
        if shape != common:
            failures.append(
                f"{sites.key(m.metadata.src_node_id)}: statistics rejected: sum of shape "
                f"{shape}, others {common}"
            )
    return [m for m, shape in checked if shape == common]


def centre_noise_norm(cfg: RunConfig, nodes: int, features: int, examples: float) -> float:
    """Expected L2 norm of the DP noise in the centre: each node adds N(0, (σ√2R)²)
    per coordinate to its sum, and the total is divided by the example count."""
    std = cfg.privacy.dp_center_noise * math.sqrt(2.0) * sum_clip(cfg)
    return std * math.sqrt(nodes * features) / max(examples, 1.0)
