"""DP-SGD step time over non-private step time, MiniLM + LoRA, same batch, one run.

Prints JSON. Target: ratio <= 1.3. Run:
    .venv/bin/python bench/dp_overhead.py [--batch 32] [--seq 64] [--steps 10]

Both paths train the same adapter on the same fixed batch of BBC News
articles; steps alternate (DP, plain, DP, plain...) so machine noise hits
both equally, and the medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
import warnings

import torch
from torch.utils.data import DataLoader

from fedlora.client.train import trainable_parameters
from fedlora.data.sources import load_bbc_news
from fedlora.models.batches import collate, encode
from fedlora.models.loading import build_model, load_tokenizer
from fedlora.privacy.dpsgd import make_private
from fedlora.privacy.settings import DPConfig
from fedlora.settings import LoraSettings


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, batch: dict) -> float:
    start = time.perf_counter()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    loss = torch.nn.functional.cross_entropy(out.logits, batch["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--mode", default="hooks", choices=["hooks", "functorch"])
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    lora = LoraSettings(rank=8, alpha=16, dropout=0.0)
    data = load_bbc_news().subset(range(args.batch))
    encoded = encode(load_tokenizer(None), data, args.seq)
    batch = collate([encoded[i] for i in range(len(encoded))], encoded.pad_id)

    plain = build_model(None, 5, lora, seed=0)
    private = copy.deepcopy(plain)
    plain.train()
    private.train()
    plain_opt = torch.optim.AdamW(trainable_parameters(plain), lr=1e-3)
    dp_opt = torch.optim.AdamW(trainable_parameters(private), lr=1e-3)
    loader = DataLoader(encoded, batch_size=args.batch, collate_fn=collate)
    config = DPConfig(
        noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=args.mode, poisson_sampling=False
    )
    wrapped = make_private(private, dp_opt, loader, config, 1.0)

    for _ in range(2):  # warm-up
        _step(plain, plain_opt, batch)
        _step(wrapped.model, wrapped.optimizer, batch)
    plain_t, dp_t = [], []
    for _ in range(args.steps):
        dp_t.append(_step(wrapped.model, wrapped.optimizer, batch))
        plain_t.append(_step(plain, plain_opt, batch))
    result = {
        "model": "all-MiniLM-L6-v2 + LoRA r=8 query,value",
        "batch": args.batch,
        "seq": args.seq,
        "grad_sample_mode": args.mode,
        "torch_threads": torch.get_num_threads(),
        "plain_step_s_median": round(statistics.median(plain_t), 4),
        "dp_step_s_median": round(statistics.median(dp_t), 4),
        "ratio_dp_over_plain": round(statistics.median(dp_t) / statistics.median(plain_t), 3),
        "target_ratio": 1.3,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
