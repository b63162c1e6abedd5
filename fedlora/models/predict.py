"""Predictions for a file of inputs from a finished run's export, either task.

``fedlora predict RUN_DIR --input FILE`` reads a CSV/JSONL/Parquet file and
writes it back with the model's answers: a classifier adds ``prediction``,
``confidence`` and one ``p_<label>`` column per label; a causal LM adds the
greedy ``response`` to each prompt. The export is loaded as a site would load
it (the classifier by fedlora's loader, which knows its pooling; the LM by
plain ``AutoPeftModelForCausalLM``), and the output is written atomically, in
the input's format unless the output's name says otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from fedlora.data.sources import read_table
from fedlora.errors import DataError
from fedlora.io import atomic_write_bytes
from fedlora.models.adapter import export_metadata, exported_folder, load_exported
from fedlora.models.generation import load_for_generation

#: Default input column per task.
DEFAULT_COLUMN = {"classification": "text", "causal-lm": "prompt"}


def predict_file(
    run_dir: Path,
    input_file: Path,
    output: Path | None = None,
    column: str | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 16,
) -> Path:
    """Write ``input_file``'s rows with the run's predictions; returns the output path."""
    folder = exported_folder(run_dir)
    meta = export_metadata(folder)
    task = str(meta.get("task") or "classification")
    column = column or DEFAULT_COLUMN[task]
    table = read_table(input_file)
    if column not in table.column_names:
        raise DataError(
            f"{input_file} has no column {column!r}; columns are: "
            f"{', '.join(table.column_names)}. Pass --column with the one that holds the "
            f"{'prompts' if task == 'causal-lm' else 'texts'}"
        )
    inputs = ["" if v is None else str(v) for v in table[column]]
    frame = table.to_pandas()
    if task == "causal-lm":
        frame["response"] = _generate(folder, inputs, max_new_tokens, batch_size)
    else:
        labels, probs = _classify(folder, meta, inputs, batch_size)
        best = probs.argmax(-1)
        frame["prediction"] = [labels[int(i)] for i in best]
        frame["confidence"] = probs.max(-1).values.numpy().round(6)
        for k, name in enumerate(labels):
            frame[f"p_{name}"] = probs[:, k].numpy().round(6)
    out = output or input_file.with_name(f"{input_file.stem}.predictions{input_file.suffix}")
    atomic_write_bytes(out, _serialise(frame, out))
    return out


def _serialise(frame: Any, out: Path) -> bytes:
    suffix = out.suffix.lower()
    if suffix == ".csv":
        return str(frame.to_csv(index=False)).encode()
    if suffix in (".jsonl", ".json"):
        return str(frame.to_json(orient="records", lines=True, force_ascii=False)).encode()
    if suffix == ".parquet":
        import io

        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return buffer.getvalue()
    raise DataError(f"output {out} has extension {out.suffix!r}; use .csv, .jsonl or .parquet")


@torch.no_grad()
def _classify(
    folder: Path, meta: dict[str, Any], texts: list[str], batch_size: int
) -> tuple[list[str], torch.Tensor]:
    from fedlora.models.loading import load_tokenizer

    # PEFT's config names the base folder (fedlora's metadata may only describe it).
    config = json.loads((folder / "adapter_config.json").read_text())
    base = str(config.get("base_model_name_or_path") or "") or None
    model, labels = load_exported(folder, base)
    model.eval()
    tokenizer = load_tokenizer(base)
    max_len = int(meta.get("max_seq_length") or 256)
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        out.append(torch.softmax(model(**batch).logits.float(), dim=-1))
    return labels, torch.cat(out)


@torch.no_grad()
def _generate(folder: Path, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy answers, batched with left padding (the chat template per prompt)."""
    model, tokenizer = load_for_generation(folder)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
            )
            for p in prompts[start : start + batch_size]
        ]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        width = batch["input_ids"].shape[1]
        answers.extend(tokenizer.decode(o[width:], skip_special_tokens=True) for o in out)
    return answers
