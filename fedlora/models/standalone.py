"""A classifier export that standard tools load correctly, and refuse to load wrongly.

PEFT's adapter folder holds the LoRA factors and the head (``modules_to_save``),
but not *what the head reads*. With ``pooling=cls`` that is the model's own
pooler, so plain ``PeftModel.from_pretrained(AutoModelForSequenceClassification
.from_pretrained(base), adapter/)`` reproduces fedlora's logits. With
``pooling=mean`` (a sentence-transformers base such as all-MiniLM-L6-v2, the
default) the head reads the masked mean of the last ``pooling-layers`` layers,
minus the federation's centre: a plain load runs the head on the untrained
CLS pooler and predicts garbage without an error (measured on an intent set:
1% against fedlora's 89%).

What this adds:

- ``standalone/``: the LoRA merged into the base, the head, and the pooling,
  as a complete transformers folder. For CLS pooling it is a plain
  ``*ForSequenceClassification`` folder; for mean pooling its config names a
  model type of its own (``fedlora-mean-<base type>``) whose small modelling
  file ships in the folder, so ``AutoModelForSequenceClassification
  .from_pretrained(standalone, trust_remote_code=True)`` gives fedlora's
  logits and a load *without* it fails with transformers' own error instead
  of silently using the standard class.
- For a mean-pooled adapter, ``adapter_config.json``'s ``task_type`` names
  the requirement (PEFT refuses an unknown task type, with that text in its
  error), so ``PeftModel.from_pretrained`` on a plain base fails loudly;
  fedlora's own loader reads the folder with the real task type.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from fedlora.models.pooling import MaskedMeanPooler

STANDALONE_DIR = "standalone"
MODELING_FILE = "modeling_fedlora.py"
#: ``task_type`` of a mean-pooled adapter: not a PEFT task type, on purpose.
MEAN_POOLED_TASK_TYPE = (
    "SEQ_CLS_WITH_FEDLORA_MEAN_POOLING: this head reads fedlora's mean-pooled sentence "
    "vector, not the CLS pooler; load this folder's standalone/ subfolder with "
    "AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=True), or "
    "this folder with "
    "fedlora.models.adapter.load_exported"
)
PEFT_TASK_TYPE = "SEQ_CLS"

_TEMPLATE = '''"""fedlora's mean-pooled classifier over {base_class}, written by fedlora's export.

The head reads the masked mean of the last ``fedlora_pooling_layers`` hidden
states (concatenated), minus ``fedlora_center``; the LoRA adapter is merged
into the encoder's weights. Load with
``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)``.
"""

import torch
from transformers.modeling_outputs import SequenceClassifierOutput
from {module} import {base_class}
from {config_module} import {config_class}


class FedloraMeanPooledConfig({config_class}):
    model_type = "{model_type}"

    def __init__(self, fedlora_pooling_layers=1, **kwargs):
        super().__init__(**kwargs)
        self.fedlora_pooling_layers = fedlora_pooling_layers


class FedloraMeanPooledForSequenceClassification({base_class}):
    config_class = FedloraMeanPooledConfig

    def __init__(self, config):
        super().__init__(config)
        layers = int(config.fedlora_pooling_layers)
        getattr(self, self.base_model_prefix).pooler = None  # the mean replaces it
        width = config.hidden_size * layers
        self.classifier = torch.nn.Linear(width, config.num_labels)
        self.register_buffer("fedlora_center", torch.zeros(width))

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        kwargs = {{k: v for k, v in kwargs.items() if v is not None}}
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        out = getattr(self, self.base_model_prefix)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=True,
            return_dict=True,
            **kwargs,
        )
        states = out.hidden_states[-int(self.config.fedlora_pooling_layers):]
        mask = attention_mask
        if mask is None:
            mask = torch.ones(states[0].shape[:2], device=states[0].device)
        weights = mask.to(states[0].dtype).unsqueeze(-1)
        pooled = torch.cat(
            [(s * weights).sum(1) / weights.sum(1).clamp(min=1.0) for s in states], dim=-1
        )
        pooled = pooled - self.fedlora_center.to(pooled.dtype)
        dropout = getattr(self, "dropout", torch.nn.Identity())
        logits = self.classifier(dropout(pooled))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''


def export_standalone(model: Any, out_dir: Path, labels: list[str], tokenizer: Any) -> Path:
    """Write ``out_dir/standalone``: merged weights, head, pooling, tokenizer, label names.

    ``model`` is fedlora's PEFT classifier with the adapter to export already
    loaded; it is copied, not changed.
    """
    from safetensors.torch import save_file

    merged = copy.deepcopy(model).merge_and_unload().eval()
    merged.config.id2label = dict(enumerate(labels))
    merged.config.label2id = {name: i for i, name in enumerate(labels)}
    folder = out_dir / STANDALONE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    pooler = next((m for m in merged.modules() if isinstance(m, MaskedMeanPooler)), None)
    if pooler is None:  # the model's own pooler: a plain transformers folder
        (folder / MODELING_FILE).unlink(missing_ok=True)
        merged.save_pretrained(str(folder))
        return folder
    width = int(merged.config.hidden_size) * pooler.layers
    center = pooler.center if pooler.center is not None else torch.zeros(width)
    state = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    state["fedlora_center"] = center.detach().float().cpu().contiguous()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    base_class = type(merged)
    config_class = type(merged.config)
    model_type = f"fedlora-mean-{merged.config.model_type}"
    (folder / MODELING_FILE).write_text(
        _TEMPLATE.format(
            base_class=base_class.__name__,
            module=base_class.__module__,
            config_class=config_class.__name__,
            config_module=config_class.__module__,
            model_type=model_type,
        )
    )
    config = merged.config.to_dict()
    config.update(
        {
            "model_type": model_type,
            "architectures": ["FedloraMeanPooledForSequenceClassification"],
            "auto_map": {
                "AutoConfig": "modeling_fedlora.FedloraMeanPooledConfig",
                "AutoModelForSequenceClassification": (
                    "modeling_fedlora.FedloraMeanPooledForSequenceClassification"
                ),
            },
            "fedlora_pooling_layers": pooler.layers,
        }
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2, default=str))
    return folder


def mark_mean_pooled(adapter_dir: Path) -> None:
    """Make a plain PEFT load of a mean-pooled adapter fail, naming how to load it."""
    path = adapter_dir / "adapter_config.json"
    config = json.loads(path.read_text())
    config["task_type"] = MEAN_POOLED_TASK_TYPE
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def peft_config_of(adapter_dir: Path) -> Any:
    """The adapter's PEFT config with its real task type (for fedlora's own loader)."""
    from peft import PeftConfig

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("task_type") == MEAN_POOLED_TASK_TYPE:
        config["task_type"] = PEFT_TASK_TYPE
    return PeftConfig.from_peft_type(**config)
