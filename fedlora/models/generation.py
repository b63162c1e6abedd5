"""Answering with a run's result: the base model plus the federated adapter, streaming.

Loaded the way a site would serve it, with plain PEFT
(``AutoPeftModelForCausalLM`` on the base named in ``adapter_config.json``),
so what ``fedlora generate`` prints is what any PEFT-based server would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fedlora.errors import ModelError
from fedlora.models.adapter import export_metadata, exported_folder


def load_for_generation(adapter_dir: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of an exported causal-LM adapter; a clear error otherwise."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    adapter_dir = exported_folder(adapter_dir)
    task = export_metadata(adapter_dir).get("task")
    if task != "causal-lm":
        raise ModelError(
            f"{adapter_dir} is a {task or 'classification'} adapter; generate needs a run "
            "with task=causal-lm (use `fedlora predict` for a classifier)"
        )
    model = AutoPeftModelForCausalLM.from_pretrained(str(adapter_dir)).eval()
    return model, AutoTokenizer.from_pretrained(str(adapter_dir))


@torch.no_grad()
def generate_text(
    run_dir: Path, prompt: str, max_new_tokens: int = 128, stream: bool = False
) -> str:
    """The greedy answer to ``prompt`` (rendered with the chat template)."""
    from transformers import TextStreamer

    model, tokenizer = load_for_generation(run_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    streamer = (
        TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    )
    out = model.generate(
        **ids,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        streamer=streamer,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return str(tokenizer.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True))
