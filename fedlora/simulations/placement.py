"""Where each virtual client ran: ``placement.jsonl`` in the run directory.

Why: on an existing Ray cluster (``fedlora simulate --ray-address``) a
researcher needs to know which machine trained which virtual client (a slow
node, a node without the data package, a GPU that was never used). A client
mod installed by the simulation only (never by a site's node) appends one
line per message a virtual client handled: its partition, the message type,
the Ray node id and IP, the process id and the GPUs Ray gave it. One short
``write`` on a file opened for appending, so lines from concurrent workers do
not interleave. On a multi-machine cluster the run directory must be on a
shared file system (as the simulated ledgers already require).
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.protocol import NODE_PARTITION_ID

PLACEMENT_FILE = "placement.jsonl"


def placement_mod(run_dir: Path) -> Callable[[Any, Any, Any], Any]:
    """A Flower client mod that records where each message was handled."""
    path = Path(run_dir) / PLACEMENT_FILE

    def record_placement(msg: Any, context: Any, call_next: Any) -> Any:
        started = time.time()
        reply = call_next(msg, context)
        try:
            import ray

            ctx = ray.get_runtime_context()
            node = ctx.get_node_id()
            gpus = [str(g) for g in ctx.get_accelerator_ids().get("GPU", [])]
            ip = ray.util.get_node_ip_address()
        except Exception:  # not inside Ray (a test calling the app directly)
            node, gpus, ip = None, [], None
        line = {
            "partition": context.node_config.get(NODE_PARTITION_ID),
            "message": msg.metadata.message_type,
            "ray_node": node,
            "ip": ip,
            "pid": os.getpid(),
            "gpus": gpus,
            "seconds": round(time.time() - started, 3),
        }
        data = (json.dumps(line) + "\n").encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return reply

    return record_placement


def read_placement(run_dir: Path) -> list[dict[str, Any]]:
    """The recorded lines (a torn last line from a killed worker is skipped)."""
    path = Path(run_dir) / PLACEMENT_FILE
    out = []
    for text in path.read_text().splitlines() if path.is_file() else []:
        try:
            out.append(json.loads(text))
        except ValueError:
            continue
    return out


def placement_summary(run_dir: Path) -> dict[str, Any]:
    """Messages handled per Ray node, and which partitions each node served."""
    rows = read_placement(run_dir)
    per_node = Counter(r["ray_node"] for r in rows)
    return {
        "nodes": len(per_node),
        "messages_per_node": dict(per_node),
        "partitions_per_node": {
            node: sorted({r["partition"] for r in rows if r["ray_node"] == node})
            for node in per_node
        },
    }
