"""A classifier export works with the standard tools a site serves models with.

Each check loads the export in a fresh Python process that imports only
transformers and PEFT (never fedlora), as a site's serving stack would, and
compares its logits with fedlora's own model.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedlora.models.adapter import adapter_state, export_classifier, load_exported
from fedlora.models.loading import build_model, load_tokenizer
from fedlora.models.pooling import set_feature_center
from fedlora.settings import LoraSettings
from fedlora.simulations.tiny import make_tiny_model

LABELS = ["money", "sport", "tech"]
TEXTS = ["the bank market shares", "a goal and the team", "chip data network code app"]

#: Run in a fresh interpreter: only transformers + peft, the way a site would load it.
_SITE_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import PeftModel
adapter, base, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
tok = AutoTokenizer.from_pretrained(adapter + "/standalone")
batch = tok(texts, padding=True, return_tensors="pt")
def logits(model):
    with torch.no_grad():
        return model.eval()(**batch).logits.tolist()
try:
    out["plain_standalone"] = logits(AutoModelForSequenceClassification.from_pretrained(
        adapter + "/standalone"))
except Exception as exc:
    out["plain_standalone_error"] = f"{type(exc).__name__}: {exc}"
out["remote_standalone"] = logits(AutoModelForSequenceClassification.from_pretrained(
    adapter + "/standalone", trust_remote_code=True))
model = AutoModelForSequenceClassification.from_pretrained(adapter + "/standalone",
    trust_remote_code=True)
out["id2label"] = {str(k): v for k, v in model.config.id2label.items()}
try:
    plain = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
    out["plain_peft"] = logits(PeftModel.from_pretrained(plain, adapter))
except Exception as exc:
    out["plain_peft_error"] = f"{type(exc).__name__}: {exc}"
out["fedlora_imported"] = any(m.startswith("fedlora") for m in sys.modules)
print("\nRESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-bert2"), layers=2)


def _trained(folder: Path, lora: LoraSettings, center: bool) -> Any:
    """A classifier whose adapter and head are far from their initial values."""
    model = build_model(folder, len(LABELS), lora, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    state = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen).numpy()
        for k, v in adapter_state(model).items()
    }
    if center:
        width = lora.pooling_layers * int(model.config.hidden_size)
        set_feature_center(model, 0.1 * torch.randn(width, generator=gen).numpy())
    return model, state


def _fedlora_logits(model: Any, folder: Path) -> np.ndarray:
    batch = load_tokenizer(folder)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.numpy()


def _site_load(adapter: Path, base: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(adapter.parent / "hf-home")}
    done = subprocess.run(
        [sys.executable, "-c", _SITE_SCRIPT, str(adapter), str(base), json.dumps(TEXTS)],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,  # transformers asks before running remote code: answer no
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.rsplit("\nRESULT ", 1)[1]))


def test_cls_pooled_export_loads_with_plain_transformers_and_plain_peft(
    tiny_dir: Path, tmp_path: Path
) -> None:
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, pooling="cls")
    model, state = _trained(tiny_dir, lora, center=False)
    out = export_classifier(model, state, tmp_path / "adapter", LABELS, {"pooling": "cls"})
    expected = _fedlora_logits(model, tiny_dir)
    site = _site_load(out, tiny_dir)
    assert not site["fedlora_imported"]
    np.testing.assert_allclose(site["plain_standalone"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(site["remote_standalone"], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(site["plain_peft"], expected, rtol=1e-4, atol=1e-5)
    assert site["id2label"] == {"0": "money", "1": "sport", "2": "tech"}


def test_mean_pooled_export_loads_right_or_fails_loudly(tiny_dir: Path, tmp_path: Path) -> None:
    """Mean of 2 layers, centred: standalone (remote code) equal; plain loads refused."""
    lora = LoraSettings(
        rank=4, alpha=8.0, dropout=0.0, pooling="mean", pooling_layers=2, feature_centering=True
    )
    model, state = _trained(tiny_dir, lora, center=True)
    meta = {"pooling": "mean", "pooling_layers": 2, "feature_centering": True}
    out = export_classifier(model, state, tmp_path / "adapter", LABELS, meta)
    expected = _fedlora_logits(model, tiny_dir)
    site = _site_load(out, tiny_dir)
    np.testing.assert_allclose(site["remote_standalone"], expected, rtol=1e-4, atol=1e-5)
    # Without the pooling code, transformers refuses rather than use the CLS pooler.
    assert "trust_remote_code" in site["plain_standalone_error"]
    # A plain PEFT load is refused with the way to load it in the message.
    assert "FEDLORA_MEAN_POOLING" in site["plain_peft_error"]
    assert "trust_remote_code=True" in site["plain_peft_error"]
    # fedlora's own loader still reads the marked folder to the same logits.
    again, labels = load_exported(out, str(tiny_dir))
    assert labels == LABELS
    np.testing.assert_allclose(_fedlora_logits(again, tiny_dir), expected, rtol=1e-5, atol=1e-6)


def test_a_second_export_into_the_same_folder_leaves_no_stale_pooling_code(
    tiny_dir: Path, tmp_path: Path
) -> None:
    mean = LoraSettings(rank=4, alpha=8.0, dropout=0.0, pooling="mean")
    model, state = _trained(tiny_dir, mean, center=False)
    out = export_classifier(model, state, tmp_path / "adapter", LABELS, {"pooling": "mean"})
    assert (out / "standalone" / "modeling_fedlora.py").is_file()
    cls = dataclasses.replace(mean, pooling="cls")
    model, state = _trained(tiny_dir, cls, center=False)
    export_classifier(model, state, out, LABELS, {"pooling": "cls"})
    assert not (out / "standalone" / "modeling_fedlora.py").exists()
    config = json.loads((out / "standalone" / "config.json").read_text())
    assert config["model_type"] == "bert" and "auto_map" not in config


def test_predict_writes_labels_and_scores_equal_to_the_model(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """`fedlora predict` on a CSV: the input rows plus prediction, confidence, p_<label>."""
    import pandas as pd
    from typer.testing import CliRunner

    from fedlora.cli.main import app

    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0, pooling="mean", pooling_layers=2)
    model, state = _trained(tiny_dir, lora, center=False)
    run_dir = tmp_path / "run"
    meta = {"pooling": "mean", "pooling_layers": 2}
    export_classifier(model, state, run_dir / "adapter", LABELS, meta)
    expected = torch.softmax(torch.tensor(_fedlora_logits(model, tiny_dir)), -1).numpy()
    src = tmp_path / "notes.csv"
    pd.DataFrame({"id": [7, 8, 9], "note": TEXTS}).to_csv(src, index=False)
    result = CliRunner().invoke(app, ["predict", str(run_dir), "-i", str(src), "--column", "note"])
    assert result.exit_code == 0, result.output
    out = pd.read_csv(tmp_path / "notes.predictions.csv")
    assert list(out["id"]) == [7, 8, 9] and list(out["note"]) == TEXTS  # rows kept, in order
    probs = out[[f"p_{name}" for name in LABELS]].to_numpy()
    np.testing.assert_allclose(probs, expected, atol=2e-6)
    assert list(out["prediction"]) == [LABELS[i] for i in expected.argmax(-1)]
    np.testing.assert_allclose(out["confidence"], expected.max(-1), atol=2e-6)
    # Bad input: the missing column is named with the columns there are; exit code 2.
    bad = CliRunner().invoke(app, ["predict", str(run_dir), "-i", str(src)])
    assert bad.exit_code == 2
    assert "no column 'text'; columns are: id, note" in bad.output
    missing = CliRunner().invoke(app, ["predict", str(tmp_path), "-i", str(src)])
    assert missing.exit_code == 2 and "holds no exported adapter" in missing.output
