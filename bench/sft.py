"""Cost of fedlora's local SFT step: speed, DP overhead, upload size, client memory.

One run, side by side, SmolLM2-135M-Instruct (or ``--model-path``), LoRA r=8 on
q,k,v,o, the same batch of drug-review instructions for every path:

- ``step_ratio_fedlora_over_plain``: tokens/s of fedlora's step (its model
  builder and response-only loss) over a plain PEFT loop (``get_peft_model`` +
  the model's own ``labels=`` loss) on the same batch; goal >= 0.9;
- ``dp_step_ratio``: fedlora's DP-SGD step (Opacus, per-example clipping of
  the LoRA tensors) over fedlora's plain step; goal <= 1.5;
- ``upload_ratio_full_over_lora``: bytes of the full fp32 model over what a
  site uploads per round (fp32 LoRA and int8-compressed LoRA);
- peak RSS of one client process (load, one train step) with
  ``base-quantization=none`` and ``int8``, each in a fresh process.

Steps alternate between paths so machine noise hits each alike; medians are
compared. Prints JSON::

    .venv/bin/python bench/sft.py [--batch 4 --seq 128 --steps 6]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Any

import torch


def _batch(tokenizer: Any, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``batch`` drug-review instructions, each exactly ``seq`` tokens (no padding)."""
    from fedlora.data.catalog import load_demo
    from fedlora.models.batches import collate
    from fedlora.models.causal_lm import encode_instructions

    data = load_demo("drug-sentiment")
    enc = encode_instructions(tokenizer, data.subset(range(4 * batch)), seq)
    full = [i for i in range(len(enc)) if len(enc.input_ids[i]) == seq][:batch]
    if len(full) < batch:
        raise SystemExit(f"only {len(full)} examples reach {seq} tokens; lower --seq")
    return collate([enc[i] for i in full], enc.pad_id)


def _timed(step: Any) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fedlora.client.train import trainable_parameters
    from fedlora.models.causal_lm import (
        ATTENTION_TARGETS,
        build_causal_lm,
        lm_loss,
        lm_model_folder,
    )
    from fedlora.models.loading import load_tokenizer
    from fedlora.privacy.dpsgd import make_private
    from fedlora.privacy.settings import DPConfig
    from fedlora.settings import LoraSettings

    folder = lm_model_folder(args.model_path or None)
    batch = _batch(load_tokenizer(folder), args.batch, args.seq)
    tokens = int(batch["attention_mask"].sum())
    lora = LoraSettings(rank=8, alpha=16.0, dropout=0.0)

    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    plain = get_peft_model(
        base,
        LoraConfig(
            r=8,
            lora_alpha=16,
            lora_dropout=0.0,
            target_modules=list(ATTENTION_TARGETS),
        ),
    ).train()
    plain_opt = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-4)
    labels = batch["targets"]

    def plain_step() -> None:
        out = plain(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels
        )
        plain_opt.zero_grad(set_to_none=True)
        out.loss.backward()
        plain_opt.step()

    ours = build_causal_lm(folder, 3, lora, 0).train()
    ours_opt = torch.optim.AdamW(trainable_parameters(ours), lr=1e-4)

    def ours_step() -> None:
        loss, _ = lm_loss(ours, batch)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    private = copy.deepcopy(ours).train()
    dp_opt = torch.optim.AdamW(trainable_parameters(private), lr=1e-4)
    from torch.utils.data import DataLoader

    # The loader only tells Opacus the batch size; every step uses the fixed batch.
    loader: DataLoader[Any] = DataLoader(list(range(args.batch)), batch_size=args.batch)
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False)
    wrapped = make_private(private, dp_opt, loader, config, 1.0)

    def dp_step() -> None:
        loss, _ = lm_loss(wrapped.model, batch)
        wrapped.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        wrapped.optimizer.step()

    for _ in range(1):  # warm-up
        plain_step(), ours_step(), dp_step()
    times: dict[str, list[float]] = {"plain": [], "fedlora": [], "dp": []}
    for _ in range(args.steps):
        times["plain"].append(_timed(plain_step))
        times["fedlora"].append(_timed(ours_step))
        times["dp"].append(_timed(dp_step))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": tokens,
        "torch_threads": torch.get_num_threads(),
        "plain_peft_tokens_per_s": round(tokens / med["plain"], 1),
        "fedlora_tokens_per_s": round(tokens / med["fedlora"], 1),
        "fedlora_dp_tokens_per_s": round(tokens / med["dp"], 1),
        "step_ratio_fedlora_over_plain": round(med["plain"] / med["fedlora"], 3),
        "dp_step_ratio": round(med["dp"] / med["fedlora"], 3),
        "goals": {"step_ratio_fedlora_over_plain": ">= 0.9", "dp_step_ratio": "<= 1.5"},
    }


def upload(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from fedlora.compression import CompressionScheme, encode
    from fedlora.models.adapter import trainable_state
    from fedlora.models.causal_lm import build_causal_lm, lm_model_folder
    from fedlora.records import payload_bytes, state_to_arrays
    from fedlora.settings import LoraSettings
    from fedlora.strategies.compressed import encoded_record

    folder = lm_model_folder(args.model_path or None)
    full = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    # Each tensor once: SmolLM2 ties its output layer to the input embeddings.
    seen: set[int] = set()
    full_state = {}
    for k, v in full.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            full_state[k] = v.detach().numpy()
    full_bytes = payload_bytes(state_to_arrays(full_state))
    state = trainable_state(build_causal_lm(folder, 3, LoraSettings(rank=8, alpha=16.0), 0))
    lora_bytes = payload_bytes(state_to_arrays(state))
    int8_bytes = payload_bytes(encoded_record(encode(state, CompressionScheme("int8", 64))))
    return {
        "full_model_fp32_bytes": full_bytes,
        "lora_params": int(sum(v.size for v in state.values())),
        "lora_fp32_bytes": lora_bytes,
        "lora_int8_bytes": int8_bytes,
        "upload_ratio_full_over_lora": round(full_bytes / lora_bytes, 1),
        "upload_ratio_full_over_lora_int8": round(full_bytes / int8_bytes, 1),
    }


def client_memory(quantization: str, args: argparse.Namespace) -> dict[str, Any]:
    """Memory of a fresh process that loads the client model and takes one train step.

    Reported from /proc/self/status: ``RssAnon`` (the process's own memory, what
    competes for RAM) apart from ``RssFile`` (the safetensors file mapped by
    transformers: page cache, droppable, and only resident where touched, so an
    fp32 load that has not yet read every weight looks smaller than it is), and
    ``VmHWM``, the peak of both (reset by exec, unlike ``ru_maxrss``).
    """
    code = (
        "import gc, sys, torch, warnings; warnings.simplefilter('ignore');"
        "st = lambda k: next(int(x.split()[1]) // 1024 for x in open('/proc/self/status') "
        "if x.startswith(k + ':'));"
        "snap = lambda: {'anon_mb': st('RssAnon'), 'file_mb': st('RssFile'), "
        "'peak_mb': st('VmHWM')};"
        "from fedlora.models.causal_lm import build_causal_lm, lm_loss, lm_model_folder;"
        "from fedlora.models.loading import load_tokenizer;"
        "from fedlora.settings import LoraSettings;"
        "sys.path.insert(0, 'bench'); from sft import _batch;"
        f"folder = lm_model_folder({args.model_path!r} or None);"
        f"m = build_causal_lm(folder, 3, LoraSettings(rank=8, alpha=16.0, "
        f"base_quantization={quantization!r}), 0).train();"
        "gc.collect(); loaded = snap();"
        f"b = _batch(load_tokenizer(folder), {args.batch}, {args.seq});"
        "loss, _ = lm_loss(m, b); loss.backward();"
        "import json; print(json.dumps({'after_load': loaded, 'after_step': snap()}))"
    )
    out = (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    return {"base_quantization": quantization, **json.loads(out)}


def quality(args: argparse.Namespace) -> dict[str, Any]:
    """What int8 costs the zero-shot base: response perplexity on the held-out drug reviews."""
    from fedlora.config import RunConfig
    from fedlora.data.partition import simulation_split
    from fedlora.models.causal_lm import build_causal_lm, lm_model_folder
    from fedlora.models.lm_eval import lm_metrics
    from fedlora.models.loading import load_tokenizer
    from fedlora.settings import LoraSettings

    cfg = RunConfig.from_flat(
        {"task": "causal-lm", "dataset": "drug-sentiment", "eval-max-examples": args.eval_examples}
    )
    folder = lm_model_folder(args.model_path or None)
    tok = load_tokenizer(folder)
    _pool, test = simulation_split(cfg.data, cfg.seed)
    from fedlora.models.causal_lm import encode_instructions

    enc = encode_instructions(tok, test, 128)
    out = {}
    for q in ("none", "int8"):
        lora = LoraSettings(rank=8, alpha=16.0, base_quantization=q)
        model = build_causal_lm(folder, 3, lora, 0)
        lm = dataclasses.replace(cfg.lm, lm_metrics=("perplexity", "choice"))
        m = lm_metrics(model, enc, tok, lm, list(test.labels.names))
        out[q] = {k: round(v, 4) for k, v in m.items()}
    return {"zero_shot_drug_sentiment": out, "examples": args.eval_examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-path", default="")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--eval-examples", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    result = {
        "model": "SmolLM2-135M-Instruct" if not args.model_path else args.model_path,
        "speed": speed(args),
        "upload": upload(args),
        "client_memory": [client_memory(q, args) for q in ("none", "int8")],
        "int8_quality": quality(args),
    }
    if not args.model_path:
        result["model"] = "SmolLM2-135M-Instruct (fp32 HF folder converted from the Q4_1 GGUF)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
