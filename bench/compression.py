"""Bytes per client update with and without compression, and what int8 costs in accuracy.

Bytes (cheap, default): the real all-MiniLM-L6-v2 with LoRA; every payload
is what a client's ArrayRecord carries, as the ``bytes-sent`` metric counts
it (tensor data plus each array's ~128-byte ``.npy`` header; the codecs use
four arrays per tensor), and ``data_bytes`` the tensor data alone, against full
fine-tuning's fp32 state dict. Encoded sizes depend on shapes only, so no
training is needed for them.

Accuracy (``--accuracy``, slow): two federated runs on BBC News, non-IID,
same seeds, ``compression=none`` vs ``int8``; final global accuracy and
bytes uploaded. The strategy must decode compressed updates: fedlora's LoRA
strategies do; a Flower strategy does once the server builds it with
``build_strategy(..., compression=cfg.train.compression)``.

Run: .venv/bin/python bench/compression.py [--accuracy --rounds 3 --clients 5
--max-train-examples 64]
Target: LoRA + int8 upload >= 1000x smaller than the full fp32 model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.compression import CompressionScheme, encode
from fedlora.compression import payload_bytes as data_bytes
from fedlora.models.adapter import adapter_state
from fedlora.models.loading import build_model, resolve_model_path
from fedlora.records import payload_bytes, state_to_arrays
from fedlora.settings import LoraSettings
from fedlora.strategies.compressed import encoded_record

CODECS = {
    "fp32": None,
    "int8": CompressionScheme("int8", block_size=64),
    "int4": CompressionScheme("int4", block_size=64),
    "topk-1%": CompressionScheme("topk", topk_fraction=0.01),
}


def full_model_bytes(num_labels: int) -> tuple[int, int]:
    """(payload bytes, parameters) of full fine-tuning: the whole fp32 state dict."""
    from transformers import AutoModelForSequenceClassification

    full = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(None)), num_labels=num_labels
    )
    state = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    return payload_bytes(state_to_arrays(state)), int(sum(v.size for v in state.values()))


def upload_bytes(state: dict[str, np.ndarray], codec: CompressionScheme | None) -> dict[str, int]:
    if codec is None:
        plain = state_to_arrays(state)
        return {"payload_bytes": payload_bytes(plain), "data_bytes": data_bytes(state)}
    encoded = encode(state, codec)
    return {
        "payload_bytes": payload_bytes(encoded_record(encoded)),
        "data_bytes": data_bytes(encoded),
    }


def bytes_table(ranks: list[int], num_labels: int) -> dict[str, Any]:
    full_bytes, full_params = full_model_bytes(num_labels)
    rows = []
    for rank in ranks:
        lora = LoraSettings(rank=rank, alpha=2 * rank)
        state = adapter_state(build_model(None, num_labels, lora, seed=0))
        for mode, sent in (
            ("lora", state),
            ("ffa-lora (B + head)", {k: v for k, v in state.items() if ".lora_A." not in k}),
        ):
            for name, codec in CODECS.items():
                size = upload_bytes(sent, codec)
                rows.append(
                    {
                        "rank": rank,
                        "payload": mode,
                        "codec": name,
                        "params": int(sum(v.size for v in sent.values())),
                        **size,
                        "full_fp32_over_this": round(full_bytes / size["payload_bytes"], 1),
                    }
                )
    return {"full_model_fp32_bytes": full_bytes, "full_model_params": full_params, "rows": rows}


def accuracy_runs(args: argparse.Namespace) -> dict[str, Any]:
    from fedlora.server.history import RunHistory
    from fedlora.simulations.engine import Resources, simulate

    out: dict[str, Any] = {}
    for codec in args.codecs.split(","):
        run_dir = Path(args.out) / f"compression-{codec}"
        cfg = {
            "dataset": "bbc-news",
            "partitioner": "dirichlet",
            "dirichlet-alpha": 0.5,
            "strategy": args.strategy,
            "num-server-rounds": args.rounds,
            "max-train-examples": args.max_train_examples,
            "learning-rate": args.lr,
            "seed": args.seed,
            "compression": codec,
            "run-dir": str(run_dir),
        }
        start = time.perf_counter()
        status = simulate(cfg, args.clients, Resources(num_cpus=1))
        records = RunHistory.load(run_dir).records
        accs = [r.global_accuracy for r in records if r.global_accuracy is not None]
        out[codec] = {
            "status": status.get("status"),
            "final_accuracy": accs[-1] if accs else None,
            "bytes_uploaded_per_round": [r.bytes_uploaded for r in records[1:]],
            "seconds": round(time.perf_counter() - start, 1),
        }
    if "none" in out and "int8" in out:
        a, b = out["none"]["final_accuracy"], out["int8"]["final_accuracy"]
        out["accuracy_int8_minus_none"] = None if a is None or b is None else round(b - a, 4)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", default="8,4")
    parser.add_argument("--num-labels", type=int, default=5)
    parser.add_argument("--accuracy", action="store_true", help="also run the two simulations")
    parser.add_argument("--codecs", default="none,int8", help="runs for --accuracy")
    parser.add_argument("--strategy", default="lora-exact")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--max-train-examples", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", default="runs/bench-compression")
    args = parser.parse_args()
    table = bytes_table([int(r) for r in args.ranks.split(",")], args.num_labels)
    int8 = next(r for r in table["rows"] if r["payload"] == "lora" and r["codec"] == "int8")
    result: dict[str, Any] = {
        "model": "all-MiniLM-L6-v2 (packaged)",
        "lora_targets": "query,value",
        "bytes": table,
        "lora_int8_ratio_at_rank": {"rank": int8["rank"], "ratio": int8["full_fp32_over_this"]},
        "target": "full fp32 / (LoRA + int8) >= 1000",
    }
    if args.accuracy:
        result["accuracy"] = accuracy_runs(args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
