"""Talking to the nodes: stable site keys, seeded sampling, sending and collecting.

* node sampling derived from ``(seed, round)`` over stable *site keys* (a
  simulation's partition id, a deployment's site name), so a round samples
  the same sites every time whatever node ids the runtime hands out, and
  replies are aggregated in site order (bit-identical sums);
* failures are data: error replies and timeouts become one line each,
  naming the site, the node and the reason; a straggler's late reply is
  logged and dropped, never counted in a later round.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any, cast

from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlora.protocol import (
    CONFIG_KEY,
    ERROR_CODE_BUDGET,
    QUERY_SITE,
    SITE_KEY,
    SITE_NAME_RULE,
    valid_site_name,
    wire_text,
)
from fedlora.server.stops import RunStopped

log = logging.getLogger("fedlora.server")


class _SampledGrid:
    """A view of the grid whose connected nodes are the ones fedlora sampled.

    Flower strategies sample with the global ``random`` module; handing them
    this view with ``fraction=1`` leaves the choice to the seeded loop.
    """

    def __init__(self, grid: Grid, node_ids: Sequence[int]):
        self._grid = grid
        self._nodes = list(node_ids)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


def sampled_view(grid: Grid, node_ids: Sequence[int]) -> Grid:
    return cast(Grid, _SampledGrid(grid, node_ids))


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from parts (Python's hash() is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SiteRegistry:
    """Maps runtime node ids to stable site keys by asking each node once.

    The key is the node's own claim, so it is checked like any other reply. A
    name outside :data:`~fedlora.protocol.SITE_NAME_RULE`, one a connected
    node already holds, one two nodes claim at once, or ``node-<id>`` for an
    id not its own (another node's fallback name) is refused and logged, and
    the node is named ``node-<id>``. A hostile node can therefore neither
    inject text into logs and files nor take a connected site's place in
    sampling and reports; at worst, claiming an honest site's name in the same
    breath, it costs that site its name for the run (both are logged). A name
    whose node has left (a SuperNode restarted under a new id) can be claimed
    again, so a restarted site keeps its name.
    """

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}

    def claim(self, claims: dict[int, object], connected: Iterable[int] | None = None) -> None:
        """Record the site keys that ``claims`` (node -> claimed name) ask for;
        ``connected``: the nodes whose names are held (default: every known node)."""
        claimed = Counter(v for v in claims.values() if isinstance(v, str))
        live = set(self.keys) if connected is None else set(connected)
        for node, name in sorted(claims.items()):
            fallback = f"node-{node}"
            text = name if isinstance(name, str) else ""
            held = {k for n, k in self.keys.items() if n != node and n in live}
            problem = (
                f"is not a site name ({SITE_NAME_RULE})"
                if not valid_site_name(text)
                else "is held by another node"
                if text in held
                else "is claimed by another node too"
                if claimed[text] > 1
                else "names another node"
                if text.startswith("node-") and text != fallback
                else None
            )
            if problem is not None:
                log.warning(
                    "node %d claimed site key %s, which %s; it is %s in this run",
                    node,
                    wire_text(repr(name), 80),
                    problem,
                    fallback,
                )
                text = fallback
            self.keys[node] = text

    def refresh(self, grid: Grid, timeout: float) -> None:
        connected = list(grid.get_node_ids())
        unknown = [n for n in connected if n not in self.keys]
        if not unknown:
            return
        content = RecordDict({CONFIG_KEY: ConfigRecord({QUERY_SITE: 1})})
        msgs = [
            Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in unknown
        ]
        claims: dict[int, object] = {}
        for reply in grid.send_and_receive(msgs, timeout=timeout):
            node = reply.metadata.src_node_id
            if node not in unknown or reply.has_error():
                continue
            if SITE_KEY not in reply.content.config_records:
                continue
            claims[node] = reply.content.config_records[SITE_KEY].get(SITE_KEY)
        self.claim(claims, connected)
        for node in unknown:
            self.keys.setdefault(node, f"node-{node}")

    def key(self, node_id: int) -> str:
        return self.keys.get(node_id, f"node-{node_id}")


def sample_nodes(
    node_ids: Iterable[int],
    sites: SiteRegistry,
    fraction: float,
    minimum: int,
    seed: int,
    server_round: int,
    purpose: str,
) -> list[int]:
    """Seeded sample of ``max(ceil(fraction*n), minimum)`` nodes, in site order."""
    ordered = sorted(node_ids, key=sites.key)
    k = min(len(ordered), max(math.ceil(fraction * len(ordered)), minimum))
    rng = random.Random(derive_seed(seed, server_round, purpose))
    chosen = rng.sample(ordered, k)
    return sorted(chosen, key=sites.key)


class Exchange:
    """Push messages, pull replies with a progress bar, drop and log late ones.

    Flower's ``send_and_receive`` blocks silently until every reply or the
    timeout. This keeps the same semantics but reports each reply as it
    arrives (one terminal bar per round) and remembers the ids it gave up on,
    so a straggler's reply that turns up later is logged and dropped instead
    of leaking into another round.
    """

    def __init__(self, grid: Grid, sites: SiteRegistry, poll: float = 0.2):
        self.grid = grid
        self.sites = sites
        self.poll = poll
        self.abandoned: dict[str, tuple[int, int]] = {}  # msg id -> (round, node)
        self.last_late: list[str] = []  # late replies dropped by the last send()

    def drain_late(self) -> list[str]:
        """Pull replies to messages an earlier round stopped waiting for."""
        if not self.abandoned:
            return []
        lines = []
        for msg in self.grid.pull_messages(list(self.abandoned)):
            rnd, node = self.abandoned.pop(msg.metadata.reply_to_message_id, (0, 0))
            lines.append(
                f"late reply from {self.sites.key(node)} (node {node}) for round {rnd} dropped"
            )
        return lines

    def _log_late(self) -> None:
        for line in self.drain_late():
            log.warning("%s", line)
            self.last_late.append(line)

    def send(
        self, messages: list[Message], timeout: float, server_round: int, label: str
    ) -> list[Message]:
        """Replies that arrived within ``timeout`` seconds."""
        self.last_late = []
        self._log_late()
        dst = {}
        ids = []
        for mid, msg in zip(self.grid.push_messages(messages), messages, strict=True):
            dst[mid] = msg.metadata.dst_node_id
            ids.append(mid)
        pending = set(ids)
        replies: list[Message] = []
        bar = _ProgressBar(f"round {server_round} {label}", len(ids))
        deadline = time.monotonic() + timeout
        while pending and time.monotonic() < deadline:
            for msg in self.grid.pull_messages(list(pending)):
                pending.discard(msg.metadata.reply_to_message_id)
                replies.append(msg)
                bar.update(len(replies))
            self._log_late()
            if pending:
                time.sleep(self.poll)
        bar.close()
        for mid in pending:
            self.abandoned[mid] = (server_round, dst[mid])
        return replies


class _ProgressBar:
    """A one-line ``[#####.....] 5/10 replies`` bar, only on a terminal."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.enabled = sys.stderr.isatty() and total > 0
        self.update(0)

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * done / self.total)
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} replies"
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * (len(self.label) + 50) + "\r")
            sys.stderr.flush()


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    """Block until ``minimum`` nodes are connected, or stop with a reason."""
    deadline = time.monotonic() + timeout
    announced = False
    while len(nodes := list(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise RunStopped(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s; "
                f"min-train-nodes={minimum}"
            )
        if not announced:
            log.info("waiting for nodes: %d connected, need %d", len(nodes), minimum)
            announced = True
        time.sleep(1.0)
    return nodes


def split_replies(
    replies: Iterable[Message],
    expected: Sequence[int],
    sites: SiteRegistry,
    exhausted: set[str] | None = None,
    sent: Sequence[Message] = (),
) -> tuple[list[Message], list[str]]:
    """Good replies in site order, and one human-readable line per failure.

    Sites that refused because their own privacy budget is spent are added
    to ``exhausted`` so they are not sampled again. A reply is attributed to
    the node its request went to (``sent``): when a node dies, the SuperLink
    answers "Node Unavailable" itself, from its own id.
    """
    dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    ok: list[Message] = []
    failures: list[str] = []
    seen: set[int] = set()
    for msg in replies:
        node = dst_of.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        seen.add(node)
        if msg.has_error() and msg.error.code == ERROR_CODE_BUDGET and exhausted is not None:
            exhausted.add(sites.key(node))
        if msg.has_error():
            failures.append(f"{sites.key(node)} (node {node}): {wire_text(msg.error.reason)}")
        else:
            ok.append(msg)
    for node in expected:
        if node not in seen:
            failures.append(f"{sites.key(node)} (node {node}): no reply before timeout")
    ok.sort(key=lambda m: sites.key(m.metadata.src_node_id))
    return ok, failures


def name_site(line: str, sites: SiteRegistry) -> str:
    """Prefix a validator's "node N: ..." line with the node's site key."""
    match = re.match(r"node (\d+)", line)
    return f"{sites.key(int(match.group(1)))} ({line})" if match else line


def reply_metrics(msg: Message) -> dict[str, float]:
    """All scalar metrics of a reply's (first) MetricRecord."""
    return metric_dict(next(iter(msg.content.metric_records.values()), None))


def metric_dict(record: MetricRecord | None) -> dict[str, float]:
    if record is None:
        return {}
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}
