"""Does the simulation scale? Overhead per round, and memory as clients grow.

Prints JSON with up to three parts:

* ``compute``: 20 clients per round (default: packaged MiniLM, local data
  capped at 32 examples). Per round, the round's wall time over the summed
  local training time of its clients (``train-time-s`` from ``clients.json``).
  With P clients training in parallel the ideal ratio is ~1/P; the excess is
  Flower/Ray messaging, model loading and the server's global evaluation.
* ``memory``: peak memory of the whole process tree (the simulation driver,
  Ray's GCS/raylet and every Ray worker) at 100 and at 1000 virtual clients
  of a tiny BERT, the same ~15 clients sampled per round in both. Sampled
  with psutil in a thread of this (light) parent while each simulation runs
  in its own child process, so one run's caches cannot inflate the next.
  Virtual clients that are not sampled should cost (almost) nothing:
  ``rss_growth_ratio`` target <= 1.10.
* ``demo`` (``--demo``): seconds per round of the README's MiniLM demo
  (10 clients, BBC News, Dirichlet α=0.5), ``--demo-rounds`` rounds.

Run: .venv/bin/python bench/sim_scale.py [--skip-compute] [--skip-memory] [--demo]
Default run (compute + memory) takes about 3-4 minutes on 2 CPU cores. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- measuring
class TreeMemorySampler(threading.Thread):
    """Peak RSS (and PSS) summed over a process and all its descendants.

    RSS counts a shared library once per process that maps it (torch in every
    Ray worker), so it overstates; PSS splits shared pages fairly. Both are
    reported; the growth ratio uses RSS, the stricter of the two.
    """

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self.peak_pss = 0
        self.peak_processes = 0
        self.peak_worker = 0  # the largest Ray client worker (ClientAppActor)
        self.samples = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            rss = pss = alive = 0
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
                alive += 1
                try:
                    if "ClientAppActor" in proc.name() + " ".join(proc.cmdline()[:1]):
                        self.peak_worker = max(self.peak_worker, info.rss)
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    pass
            self.peak_rss = max(self.peak_rss, rss)
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_processes = max(self.peak_processes, alive)
            self.samples += 1
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def run_child(spec: dict[str, Any], log_path: Path, timeout: float, interval: float) -> dict:
    """Run one simulation in a child process while sampling its tree's memory."""
    start = time.perf_counter()
    with log_path.open("w") as log:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        sampler = TreeMemorySampler(child.pid, interval)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        finally:
            sampler.stop()
    run_dir = Path(spec["overrides"]["run-dir"])
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    return {
        "exit_code": code,
        "status": status.get("status", "missing"),
        "reason": status.get("reason", ""),
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(sampler.peak_rss / 2**20, 1),
        "peak_pss_mb": round(sampler.peak_pss / 2**20, 1),
        "peak_processes": sampler.peak_processes,
        "memory_samples": sampler.samples,
        "log": str(log_path),
    }


def child_main(spec_json: str) -> None:
    """In the child: run one simulation (the parent measures it)."""
    from fedlora.simulations.engine import Resources, simulate

    spec = json.loads(spec_json)
    status = simulate(spec["overrides"], spec["num_clients"], Resources(spec["num_cpus"]))
    print(json.dumps(status))
    sys.exit(0 if status.get("status") == "completed" else 1)


def per_round_compute(run_dir: Path) -> list[dict[str, Any]]:
    """Round wall time vs the summed ``train-time-s`` of that round's clients."""
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    clients_file = run_dir / "clients.json"
    clients = json.loads(clients_file.read_text()) if clients_file.is_file() else None
    out = []
    for r in rounds:
        if r["round"] == 0:
            continue
        if clients is not None:
            times = [c.get("train-time-s", 0.0) for c in clients if c["round"] == r["round"]]
            compute, source = float(sum(times)), "clients.json"
        else:  # FedAvg's weighted mean x clients: exact only for equal-size clients
            mean = float(r.get("extra", {}).get("train-time-s", 0.0))
            compute, source = mean * r["clients_ok"], "mean x clients_ok"
        out.append(
            {
                "round": r["round"],
                "clients_ok": r["clients_ok"],
                "round_wall_s": r["seconds"],
                "client_compute_sum_s": round(compute, 3),
                "wall_over_compute": round(r["seconds"] / compute, 3) if compute else None,
                "compute_source": source,
            }
        )
    return out


# ---------------------------------------------------------------- scenarios
def tiny_assets(work: Path, rows: int) -> tuple[Path, Path]:
    """The test suite's tiny BERT and a learnable 3-class CSV of ``rows`` rows."""
    from fedlora.simulations.tiny import make_text_csv, make_tiny_model

    model = work / "tiny-model"
    if not (model / "config.json").is_file():
        make_tiny_model(model)
    data = work / f"tiny-{rows}.csv"
    if not data.is_file():
        make_text_csv(data, n=rows, seed=0)
    return model, data


def tiny_overrides(model: Path, data: Path) -> dict[str, Any]:
    """The tests' tiny run, with almost all data in the clients' pool."""
    from fedlora.simulations.tiny import tiny_run_config

    config = tiny_run_config(model, data, "", **{"test-fraction": 0.05})
    del config["run-dir"], config["num-server-rounds"], config["min-train-nodes"]
    return config


def bench_compute(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if args.compute_model == "tiny":
        model, data = tiny_assets(work, rows=4000)
        base = tiny_overrides(model, data)
    else:  # the packaged MiniLM on BBC News; small server test split keeps eval short
        base = {"dataset": "bbc-news", "partitioner": "iid", "test-fraction": 0.05}
    run_dir = work / f"compute-{args.compute_model}"
    spec = {
        "overrides": {
            **base,
            "num-server-rounds": args.rounds,
            "max-train-examples": args.max_train_examples,
            "max-seq-length": 64 if args.compute_model == "minilm" else 32,
            "run-dir": str(run_dir),
        },
        "num_clients": args.clients_per_round,
        "num_cpus": args.num_cpus,
    }
    result = run_child(spec, work / "compute.log", args.timeout, args.interval)
    rounds = per_round_compute(run_dir) if result["status"] == "completed" else []
    steady = [r["wall_over_compute"] for r in rounds[1:] if r["wall_over_compute"]]
    slots = max(1, min(args.clients_per_round, int((os.cpu_count() or 1) / args.num_cpus)))
    return {
        "model": args.compute_model,
        "clients_per_round": args.clients_per_round,
        "max_train_examples": args.max_train_examples,
        "parallel_clients": slots,
        "ideal_wall_over_compute": round(1 / slots, 3),
        "rounds": rounds,
        "steady_wall_over_compute_mean": round(sum(steady) / len(steady), 3) if steady else None,
        **{k: result[k] for k in ("status", "reason", "wall_s", "peak_rss_mb", "log")},
    }


def bench_memory(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    sizes = [int(n) for n in args.memory_clients.split(",")]
    model, data = tiny_assets(work, rows=max(12 * max(sizes), 1200))
    runs = {}
    for n in sizes:
        spec = {
            "overrides": {
                **tiny_overrides(model, data),
                "num-server-rounds": args.memory_rounds,
                "fraction-train": args.memory_sampled / n,
                "min-train-nodes": 2,
                "run-dir": str(work / f"memory-{n}"),
            },
            "num_clients": n,
            "num_cpus": args.num_cpus,
        }
        result = run_child(spec, work / f"memory-{n}.log", args.timeout, args.interval)
        metrics = work / f"memory-{n}" / "metrics.json"
        rounds = json.loads(metrics.read_text())["rounds"] if metrics.is_file() else []
        result["clients_sampled_per_round"] = [r["clients_sampled"] for r in rounds[1:]]
        result["round_wall_s"] = [r["seconds"] for r in rounds[1:]]
        runs[str(n)] = result
    out: dict[str, Any] = {"runs": runs}
    if len(sizes) >= 2:
        lo, hi = runs[str(sizes[0])], runs[str(sizes[-1])]
        out["rss_growth_ratio"] = round(hi["peak_rss_mb"] / lo["peak_rss_mb"], 3)
        out["pss_growth_ratio"] = round(hi["peak_pss_mb"] / lo["peak_pss_mb"], 3)
        out["target_rss_growth_ratio"] = 1.10
        out["meets_target"] = out["rss_growth_ratio"] <= 1.10
    return out


def bench_demo(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    run_dir = work / "demo"
    spec = {
        "overrides": {
            "num-server-rounds": args.demo_rounds,
            "max-seq-length": 64,
            "run-dir": str(run_dir),
        },
        "num_clients": 10,
        "num_cpus": args.num_cpus,
    }
    result = run_child(spec, work / "demo.log", args.timeout, args.interval)
    metrics = run_dir / "metrics.json"
    rounds = json.loads(metrics.read_text())["rounds"] if metrics.is_file() else []
    return {
        "rounds": [
            {"round": r["round"], "seconds": r["seconds"], "global_accuracy": r["global_accuracy"]}
            for r in rounds[1:]
        ],
        **{k: result[k] for k in ("status", "reason", "wall_s", "peak_rss_mb", "log")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work-dir", default="", help="Keep runs and logs here (default: tmp).")
    parser.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per virtual client.")
    parser.add_argument("--interval", type=float, default=0.25, help="Memory sampling period.")
    parser.add_argument("--timeout", type=float, default=600, help="Seconds per simulation.")
    parser.add_argument("--skip-compute", action="store_true")
    parser.add_argument("--compute-model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--clients-per-round", type=int, default=20)
    parser.add_argument("--max-train-examples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-clients", default="100,1000")
    parser.add_argument("--memory-sampled", type=int, default=15, help="Clients per round.")
    parser.add_argument("--memory-rounds", type=int, default=2)
    parser.add_argument("--demo", action="store_true", help="Also time the MiniLM demo.")
    parser.add_argument("--demo-rounds", type=int, default=2)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="fedlora-sim-scale-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"cpu_count": os.cpu_count(), "work_dir": str(work)}
    if not args.skip_compute:
        report["compute"] = bench_compute(args, work)
    if not args.skip_memory:
        report["memory"] = bench_memory(args, work)
    if args.demo:
        report["demo"] = bench_demo(args, work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
