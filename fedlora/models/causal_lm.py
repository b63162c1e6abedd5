"""The causal-LM task: instruction tuning (SFT) of a decoder with LoRA on its attention.

One example is one prompt/response pair rendered with the tokenizer's own
chat template; the loss covers the response tokens only (prompt tokens carry
the target -100) and is the mean over examples of each example's mean token
loss, so DP-SGD's unit (one pair) is the loss's unit too. Logits are
computed only at response positions (the output layer over a 49k vocabulary
is a fifth of a small model's compute), through the base model's decoder and
output embeddings, which also works under Opacus' wrapper.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from fedlora.data.instructions import prompt_text, response_text
from fedlora.data.sources import TextDataset
from fedlora.errors import DataError, ModelError
from fedlora.models.batches import EncodedDataset, eval_batches, to_device
from fedlora.models.loading import resolve_model_path
from fedlora.models.packaged_lm import packaged_lm_path
from fedlora.settings import LoraSettings

log = logging.getLogger("fedlora.models")

#: ``lora-target-modules=auto``: attention projections (Llama, Qwen, Mistral), GPT-2's fused one.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_GPT2_TARGETS = ("c_attn",)
IGNORE = -100


def lm_model_folder(model_path: str | os.PathLike[str] | None) -> Path:
    """The causal LM's folder: the packaged SmolLM2 (converted once) or a checked local one."""
    if not model_path:
        return packaged_lm_path()
    path = resolve_model_path(model_path)
    check_causal_lm(path)
    return path


def check_causal_lm(path: Path) -> None:
    """Refuse an encoder's (or any non-causal) folder under task=causal-lm."""
    config = json.loads((path / "config.json").read_text())
    archs = [str(a) for a in config.get("architectures") or []]
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if not causal:
        kind = f"{config.get('model_type', '?')} ({', '.join(archs) or 'no architectures'})"
        raise ModelError(
            f"model-path {path} holds a {kind} model, not a causal language model; "
            "task=causal-lm needs a *ForCausalLM folder (Llama, Qwen, Mistral, GPT-2 "
            "families; empty model-path = packaged SmolLM2-135M-Instruct), or use "
            "task=classification for an encoder"
        )


def _targets(base: Any, lora: LoraSettings) -> list[str]:
    if not lora.auto_targets:
        return list(lora.target_modules)
    names = {n.split(".")[-1] for n, _ in base.named_modules()}
    if set(ATTENTION_TARGETS) <= names:
        return list(ATTENTION_TARGETS)
    if set(_GPT2_TARGETS) <= names:
        return list(_GPT2_TARGETS)
    raise ModelError(
        "lora-target-modules=auto found no attention projections (q_proj..o_proj or "
        "c_attn) in this model; set lora-target-modules to its linear layer names"
    )


def build_causal_lm(
    model_path: str | os.PathLike[str] | None,
    num_labels: int,
    lora: LoraSettings,
    seed: int,
    device: str | torch.device = "cpu",
) -> Any:
    """The frozen decoder (device first) with LoRA on its attention (PEFT second)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    del num_labels  # the answer is text; the label list lives in the data
    path = lm_model_folder(model_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            base = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, **quantization_kwargs(lora.base_quantization)
            )
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelError(f"cannot load a causal LM from {path}: {exc}") from exc
        base = base.to(torch.device(device))  # type: ignore[arg-type]  # move first, wrap second (opacus#820)
        config = LoraConfig(
            r=lora.rank,
            lora_alpha=lora.alpha,  # type: ignore[arg-type]  # PEFT accepts floats
            lora_dropout=lora.dropout,
            target_modules=_targets(base, lora),
            task_type="CAUSAL_LM",
        )
        try:
            return get_peft_model(base, config)
        except ValueError as exc:
            raise ModelError(
                f"lora-target-modules do not match the model's layers ({exc})"
            ) from exc


def quantization_kwargs(mode: str) -> dict[str, Any]:
    """``from_pretrained`` arguments that keep the frozen base's linear weights in ``mode``.

    int8 is torchao's weight-only int8 (per-channel scales), which runs on CPU
    and which PEFT wraps with its own LoRA layer (``TorchaoLoraLinear``): the
    base's linear weights shrink 4x, the adapters stay fp32 and train as
    usual. int4 is refused: PEFT's torchao LoRA layer is int8-only and its
    4-bit path (bitsandbytes) needs CUDA.
    """
    if mode == "none":
        return {}
    if mode == "int4":
        raise ModelError(
            "base-quantization=int4 is not supported on this machine: PEFT's LoRA over "
            "4-bit weights needs bitsandbytes' CUDA backend, and PEFT's torchao LoRA layer "
            "is int8-only. Use base-quantization=int8 on CPU, or none"
        )
    try:
        from torchao.quantization import Int8WeightOnlyConfig
        from transformers import TorchAoConfig
    except ImportError as exc:
        raise ModelError(
            "base-quantization=int8 needs torchao; run `pip install torchao` "
            "(scripts/setup.sh does) or set base-quantization=none"
        ) from exc
    return {"quantization_config": TorchAoConfig(quant_type=Int8WeightOnlyConfig())}


def _chat(tokenizer: Any, data: TextDataset, i: int) -> tuple[str, str]:
    """(prompt with the generation marker, response with its end token) as text."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(
            f"the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) has no chat template; "
            "instruction tuning renders each example with the model's own template. Use an "
            "instruct/chat model folder, or add chat_template to its tokenizer_config.json"
        )
    turns = json.loads(data.contexts[i]) if data.contexts else []
    turns.append({"role": "user", "content": prompt_text(data, i)})
    answer = response_text(data, i)
    if not answer.strip():
        raise DataError(f"{data.source}: example {i} has an empty response; drop or fill it")
    prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*turns, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ModelError(
            "the chat template does not render the prompt as a prefix of prompt + answer; "
            "the response-only loss cannot find where the answer starts"
        )
    return prompt, full[len(prompt) :].rstrip()


def fit(prompt: list[int], response: list[int], max_len: int) -> tuple[list[int], int, str]:
    """(ids, prompt length, what was cut) within ``max_len``, the response kept.

    A long prompt loses its middle (its head, the instruction, and its last 16
    tokens, the answer marker, stay); a response that alone leaves under a
    quarter of the budget for the prompt is cut at its end.
    """
    if len(prompt) + len(response) <= max_len:
        return prompt + response, len(prompt), ""
    cut = ""
    keep_prompt = min(len(prompt), max(8, max_len // 4))
    if len(response) > max_len - keep_prompt:
        response, cut = response[: max_len - keep_prompt], "response"
    budget = max_len - len(response)
    if len(prompt) > budget:
        tail = min(16, budget // 2)
        prompt, cut = prompt[: budget - tail] + prompt[len(prompt) - tail :], cut or "prompt"
    return prompt + response, len(prompt), cut


def encode_instructions(tokenizer: Any, data: TextDataset, max_seq_length: int) -> EncodedDataset:
    """Render, tokenise and mask every example once (padding is per batch)."""
    if len(data) == 0:
        raise DataError(f"{data.source} has no examples to train or evaluate on")
    ids, targets, prompts = [], [], []
    cuts = {"prompt": 0, "response": 0}
    for i in range(len(data)):
        prompt, answer = _chat(tokenizer, data, i)
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(answer, add_special_tokens=False)["input_ids"]
        row, n_prompt, cut = fit(p, r, max_seq_length)
        if cut:
            cuts[cut] += 1
        ids.append(row)
        targets.append([IGNORE] * n_prompt + row[n_prompt:])
        prompts.append(n_prompt)
    if any(cuts.values()):
        log.info(
            "%s: %d prompt(s) cut in the middle and %d response(s) cut at the end to fit "
            "max-seq-length=%d (the instruction's head and the answer marker are kept)",
            data.source,
            cuts["prompt"],
            cuts["response"],
            max_seq_length,
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = EncodedDataset(ids, data.label_ids, int(pad or 0), targets=targets)
    out.prompt_lengths = prompts
    if data.label_style:  # each label's answer tokens, rendered by the same template
        for name in data.labels.names:
            one = dataclasses.replace(data.subset([0]), responses=(name,))
            out.choices.append(
                tokenizer(_chat(tokenizer, one, 0)[1], add_special_tokens=False)["input_ids"]
            )
    return out


def response_scores(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Per example: (summed response log-likelihood, response tokens, all tokens right)."""
    peft = getattr(model, "_module", model)  # Opacus' GradSampleModule wraps the PeftModel
    causal = peft.get_base_model()
    hidden = causal.base_model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    targets = batch["targets"][:, 1:]
    mask = targets != IGNORE
    logits = causal.get_output_embeddings()(hidden[:, :-1][mask]).float()
    gold = targets[mask]
    token_logp = torch.log_softmax(logits, dim=-1).gather(1, gold[:, None]).squeeze(1)
    rows = mask.nonzero()[:, 0]
    n = batch["input_ids"].shape[0]
    logp = torch.zeros(n, dtype=token_logp.dtype, device=token_logp.device)
    logp = logp.index_add(0, rows, token_logp)
    counts = torch.bincount(rows, minlength=n)
    wrong = torch.bincount(rows[logits.argmax(-1) != gold], minlength=n)
    return logp, counts, (wrong == 0) & (counts > 0)


def lm_loss(
    model: Any, batch: dict[str, torch.Tensor], log_prior: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """Mean over examples of each example's mean response-token NLL; examples all right."""
    del log_prior  # no head, no prior
    logp, counts, right = response_scores(model, batch)
    loss = (-logp / counts.clamp(min=1)).mean()
    return loss, int(right.sum())


@torch.no_grad()
def lm_evaluate(
    model: Any, dataset: EncodedDataset, batch_size: int = 16
) -> tuple[float, float, int]:
    """(mean example loss, share of examples whose response is all argmax-right, examples)."""
    model.eval()
    loss_sum, right_sum, seen = 0.0, 0, 0
    for _idx, batch in eval_batches(dataset, batch_size):
        batch = to_device(batch, model)
        logp, counts, right = response_scores(model, batch)
        loss_sum += float((-logp / counts.clamp(min=1)).sum())
        right_sum += int(right.sum())
        seen += int(counts.numel())
    return loss_sum / max(seen, 1), right_sum / max(seen, 1), seen


def export_causal_lm(
    model: Any,
    state: dict[str, Any],
    out_dir: str | os.PathLike[str],
    labels: list[str],
    metadata: dict[str, Any] | None = None,
) -> Path:
    """A PEFT folder ``AutoPeftModelForCausalLM.from_pretrained`` loads on its base, plus the
    label list and fedlora's metadata; the base's tokenizer is saved beside it."""
    from fedlora.models.adapter import export_adapter
    from fedlora.models.loading import load_tokenizer

    out = export_adapter(model, state, out_dir, labels, {**(metadata or {}), "task": "causal-lm"})
    base = str(model.peft_config["default"].base_model_name_or_path or "")
    if base and Path(base).is_dir():
        load_tokenizer(base).save_pretrained(str(out))
    return out
