"""The README demo, measured: wall time, final global accuracy, peak memory.

Runs exactly `fedlora simulate` (plus any -c overrides passed through) as a
child process and samples the memory of its whole process tree (server,
Ray's processes and its workers). Prints JSON. Run:

    .venv/bin/python bench/demo.py [-c key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sim_scale import TreeMemorySampler  # same folder

from fedlora.server.history import RunHistory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-c", "--config", action="append", default=[])
    parser.add_argument("-n", "--num-clients", type=int, default=10)
    args = parser.parse_args()
    run_dir = Path(tempfile.mkdtemp(prefix="fedlora-demo-"))
    cmd = [
        sys.executable,
        "-m",
        "fedlora.cli",
        "simulate",
        "-n",
        str(args.num_clients),
        "-c",
        f"run-dir={str(run_dir)!r}".replace("'", '"'),
    ]
    for item in args.config:
        cmd += ["-c", item]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sampler = TreeMemorySampler(proc.pid, 0.5)
    sampler.start()
    code = proc.wait()
    sampler.stop()
    wall = time.perf_counter() - start
    history = RunHistory.load(run_dir)
    last = history.records[-1] if history.records else None
    print(
        json.dumps(
            {
                "command": " ".join(cmd[1:]),
                "exit_code": code,
                "wall_seconds": round(wall, 1),
                "rounds": len(history.records) - 1,
                "final_global_accuracy": last.global_accuracy if last else None,
                "accuracy_per_round": [r.global_accuracy for r in history.records],
                "mb_uploaded_per_round": round(last.bytes_uploaded / 1e6, 3) if last else None,
                "peak_rss_mb_process_tree": round(sampler.peak_rss / 2**20),
                "peak_pss_mb_process_tree": round(sampler.peak_pss / 2**20),
                "run_dir": str(run_dir),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
