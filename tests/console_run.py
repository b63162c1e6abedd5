"""A tiny live simulation for the console's browser test (run as a script).

Its own process, so the test can drive the browser while rounds arrive.
Site 0 fails every training round with a reason that carries HTML (what a
hostile node could send), and every node pauses so rounds arrive seconds
apart. Usage: ``python console_run.py MODEL_DIR DATA_CSV RUN_DIR``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

HOSTILE = "disk on fire at site 0 <img src=x id=pwned>"


def fail_zero_and_pause(msg: Any, context: Any, call_next: Any) -> Any:
    if msg.metadata.message_type == "train":
        time.sleep(2.0)
        if int(context.node_config.get("partition-id", -1)) == 0:
            raise RuntimeError(HOSTILE)
    return call_next(msg, context)


if __name__ == "__main__":
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.tiny import tiny_run_config

    model, data, run = sys.argv[1:4]
    flat = tiny_run_config(model, data, run, **{"num-server-rounds": 3})
    status = simulate(flat, 3, Resources(num_cpus=1), client_mods=[fail_zero_and_pause])
    sys.exit(0 if status["status"] == "completed" else 1)
