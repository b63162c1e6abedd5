"""Bytes a client uploads per round: LoRA adapter vs the full model.

Prints JSON. Run: .venv/bin/python bench/comm.py [--rank 8] [--targets query,value]
"""

from __future__ import annotations

import argparse
import json

from fedlora.models.adapter import adapter_state
from fedlora.models.loading import build_model, default_model_path
from fedlora.records import payload_bytes, state_to_arrays
from fedlora.settings import LoraSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--num-labels", type=int, default=5)
    parser.add_argument("--model-path", default="")
    args = parser.parse_args()
    lora = LoraSettings(
        rank=args.rank, alpha=2 * args.rank, target_modules=tuple(args.targets.split(","))
    )
    model = build_model(args.model_path or None, args.num_labels, lora, seed=0)
    lora_state = adapter_state(model)
    from transformers import AutoModelForSequenceClassification

    from fedlora.models.loading import resolve_model_path

    # Full fine-tuning would send every tensor of the plain classifier.
    full = AutoModelForSequenceClassification.from_pretrained(
        str(resolve_model_path(args.model_path or None)), num_labels=args.num_labels
    )
    full_state = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    lora_bytes = payload_bytes(state_to_arrays(lora_state))
    full_bytes = payload_bytes(state_to_arrays(full_state))
    print(
        json.dumps(
            {
                "model": str(args.model_path or default_model_path()),
                "lora_rank": args.rank,
                "lora_targets": args.targets,
                "lora_params": int(sum(v.size for v in lora_state.values())),
                "full_params": int(sum(v.size for v in full_state.values())),
                "lora_bytes_per_round": lora_bytes,
                "full_bytes_per_round": full_bytes,
                "ratio_full_over_lora": round(full_bytes / lora_bytes, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
