"""Model and adapter: same base everywhere, only trainable tensors travel, PEFT export."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.errors import ModelError
from fedlora.models.adapter import adapter_state, export_adapter, load_adapter_state, load_exported
from fedlora.models.loading import build_model, resolve_model_path
from fedlora.models.pooling import MaskedMeanPooler, install_pooling, resolve_pooling
from fedlora.settings import LoraSettings

LORA = LoraSettings(rank=4, alpha=8, dropout=0.0, target_modules=("query", "value"))


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_payload_is_exactly_the_trainable_tensors(tiny_model_dir: Path) -> None:
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    state = adapter_state(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(state) == len(trainable)
    assert sum(v.size for v in state.values()) == sum(p.numel() for p in trainable)
    lora = [k for k in state if ".lora_A." in k or ".lora_B." in k]
    head = [k for k in state if "classifier" in k]
    assert sorted(lora + head) == sorted(state)
    assert len(lora) == 4  # A and B for query and value in one layer
    assert not any("embeddings" in k or "attention.output" in k for k in state)


def test_same_seed_same_initial_adapter_different_seed_differs(
    tiny_model_dir: Path,
) -> None:
    a = adapter_state(build_model(tiny_model_dir, 3, LORA, seed=7))
    b = adapter_state(build_model(tiny_model_dir, 3, LORA, seed=7))
    c = adapter_state(build_model(tiny_model_dir, 3, LORA, seed=8))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert any(not np.array_equal(a[k], c[k]) for k in a)


def test_global_rng_untouched_by_model_building(tiny_model_dir: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(tiny_model_dir, 3, LORA, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_adapter_state_round_trip(tiny_model_dir: Path) -> None:
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    rng = np.random.default_rng(0)
    new = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    load_adapter_state(model, new)
    back = adapter_state(model)
    assert all(np.array_equal(back[k], new[k]) for k in new)


def test_load_is_strict(tiny_model_dir: Path) -> None:
    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    state = adapter_state(model)
    key = next(iter(state))
    with pytest.raises(ModelError, match="missing"):
        load_adapter_state(model, {k: v for k, v in state.items() if k != key})
    with pytest.raises(ModelError, match="unexpected"):
        load_adapter_state(
            model, {**state, "base_model.model.bert.pooler.dense.weight": state[key]}
        )
    with pytest.raises(ModelError, match="shape"):
        load_adapter_state(model, {**state, key: np.zeros((1, 1), np.float32)})


def test_export_reloads_with_peft_to_identical_logits(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    rng = np.random.default_rng(1)
    trained = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    export_adapter(model, trained, tmp_path / "adapter", ["a", "b", "c"], {"rounds": 1})
    expected = _logits(model)

    base = AutoModelForSequenceClassification.from_pretrained(str(tiny_model_dir), num_labels=3)
    reloaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    assert torch.allclose(_logits(reloaded), expected, atol=1e-6)
    again, labels = load_exported(tmp_path / "adapter", str(tiny_model_dir))
    assert labels == ["a", "b", "c"]
    assert torch.allclose(_logits(again), expected, atol=1e-6)


def test_model_folder_errors_name_the_folder_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="is not a folder"):
        resolve_model_path(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelError, match=f"{tmp_path} has no weights"):
        resolve_model_path(tmp_path)


def test_bad_target_modules_lists_layer_names(tiny_model_dir: Path) -> None:
    bad = LoraSettings(rank=4, target_modules=("q_proj",))
    with pytest.raises(ModelError, match="lora-target-modules=q_proj"):
        build_model(tiny_model_dir, 3, bad, seed=0)


def test_packaged_default_model_folder_is_complete() -> None:
    path = resolve_model_path("")
    assert (path / "config.json").is_file()


def _write_st_pooling(folder: Path, mean: bool) -> None:
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "modules.json").write_text(
        '[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},'
        ' {"idx": 1, "name": "1", "path": "1_Pooling", '
        '"type": "sentence_transformers.models.Pooling"}]'
    )
    (folder / "1_Pooling" / "config.json").write_text(
        f'{{"pooling_mode_mean_tokens": {str(mean).lower()}, '
        f'"pooling_mode_cls_token": {str(not mean).lower()}}}'
    )


def test_pooling_auto_follows_the_sentence_transformers_config(tmp_path: Path) -> None:
    assert resolve_pooling(tmp_path, "auto") == "cls"  # plain HF folder
    _write_st_pooling(tmp_path, mean=True)
    assert resolve_pooling(tmp_path, "auto") == "mean"
    _write_st_pooling(tmp_path, mean=False)
    assert resolve_pooling(tmp_path, "auto") == "cls"
    assert resolve_pooling(tmp_path, "mean") == "mean"  # explicit choice wins
    # The packaged all-MiniLM-L6-v2 was trained with mean pooling.
    assert resolve_pooling(resolve_model_path(None), "auto") == "mean"


def test_masked_mean_pooler_by_hand() -> None:
    pooler = MaskedMeanPooler()
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]]
    )
    pooler.attention_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(pooler(hidden), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_mean_pooling_model_reads_the_masked_mean(tiny_model_dir: Path) -> None:
    """Logits = head(masked mean of the last hidden states): padding changes nothing,
    and a deep copy (what a DP round trains) pools with its own mask."""
    import copy

    model = build_model(tiny_model_dir, 3, replace(LORA, pooling="mean"), seed=0).eval()
    ids = torch.tensor([[2, 40, 41, 42, 3, 0, 0], [2, 50, 51, 3, 0, 0, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.base_model.model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        pooled = (hidden * weights).sum(1) / weights.sum(1)
        head = model.base_model.model.classifier
        assert torch.allclose(logits, head(pooled), atol=1e-5)
        short = model(input_ids=ids[:1, :5], attention_mask=mask[:1, :5]).logits
        assert torch.allclose(short, logits[:1], atol=1e-5)
        twin = copy.deepcopy(model)
        assert torch.allclose(twin(input_ids=ids, attention_mask=mask).logits, logits, atol=1e-6)
    cls = build_model(tiny_model_dir, 3, replace(LORA, pooling="cls"), seed=0).eval()
    with torch.no_grad():
        assert not torch.allclose(cls(input_ids=ids, attention_mask=mask).logits, logits)


def test_export_records_pooling_and_reloads_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = build_model(tiny_model_dir, 3, replace(LORA, pooling="mean"), seed=0)
    rng = np.random.default_rng(2)
    trained = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    export_adapter(model, trained, tmp_path / "adapter", ["a", "b", "c"], {"pooling": "mean"})
    again, _ = load_exported(tmp_path / "adapter", str(tiny_model_dir))
    assert torch.allclose(_logits(again), _logits(model), atol=1e-6)


def test_mean_pooling_needs_a_pooler(tiny_model_dir: Path) -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    other = DistilBertForSequenceClassification(
        DistilBertConfig(vocab_size=50, dim=8, n_layers=1, n_heads=2, hidden_dim=16)
    )
    with pytest.raises(ModelError, match="pooling=mean.*Set pooling=cls"):
        install_pooling(other, "mean")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_lora_lr_ratio_sets_the_lora_tensors_rate_only(
    tiny_model_dir: Path, optimizer: str
) -> None:
    from fedlora.client.train import make_optimizer, trainable_parameters
    from fedlora.settings import TrainSettings

    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    settings = TrainSettings(optimizer=optimizer, learning_rate=0.5, lora_lr_ratio=4.0)
    opt = make_optimizer(model, settings)
    rate = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(rate) == sorted(id(p) for p in trainable_parameters(model))
    lora = [rate[i] for i in rate if "lora_" in names[i]]
    head = [rate[i] for i in rate if "lora_" not in names[i]]
    assert lora and head
    assert set(lora) == {2.0} and set(head) == {0.5}
    plain = make_optimizer(model, TrainSettings(optimizer=optimizer, learning_rate=0.5))
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 0.5


def test_pooling_layers_reads_the_last_layers_means_and_reloads(tmp_path: Path) -> None:
    """pooling-layers=2: the head reads [mean(layer 1), mean(layer 2)] (checked
    against HF's own hidden states), and an exported adapter reloads onto a
    fresh base with the same wide head and identical logits."""
    from fedlora.simulations.tiny import make_tiny_model

    folder = make_tiny_model(tmp_path / "two-layer", layers=2)
    lora = replace(LORA, pooling="mean", pooling_layers=2)
    model = build_model(folder, 3, lora, seed=0)
    model.eval()
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    mask = (ids != 0).long()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        states = model.base_model.model.bert(
            input_ids=ids, attention_mask=mask, output_hidden_states=True
        ).hidden_states
    weights = mask.unsqueeze(-1).float()
    pooled = torch.cat([(h * weights).sum(1) / weights.sum(1) for h in states[-2:]], -1)
    assert pooled.shape == (2, 32)
    with torch.no_grad():
        want = model.base_model.model.classifier(pooled)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    rng = np.random.default_rng(2)
    trained = {
        k: rng.standard_normal(v.shape).astype(np.float32) for k, v in adapter_state(model).items()
    }
    meta = {"pooling": "mean", "pooling_layers": 2}
    export_adapter(model, trained, tmp_path / "adapter", ["a", "b", "c"], meta)
    again, _labels = load_exported(tmp_path / "adapter", str(folder))
    torch.testing.assert_close(_logits(again), _logits(model), atol=1e-6, rtol=1e-5)


def test_pooling_layers_errors_name_the_fix(tiny_model_dir: Path) -> None:
    with pytest.raises(ModelError, match="needs pooling=mean; set pooling-layers=1"):
        build_model(tiny_model_dir, 3, replace(LORA, pooling="cls", pooling_layers=2), seed=0)
    with pytest.raises(ModelError, match="at least 3 encoder layers.*pooling-layers=1"):
        build_model(tiny_model_dir, 3, replace(LORA, pooling="mean", pooling_layers=3), seed=0)


def test_label_counts_noise_has_the_configured_std() -> None:
    """Gaussian noise on the counts: over 4000 draws the sample std is within
    5 % of dp-label-noise (its standard error is about 1.1 %) and the mean
    within 4 standard errors of the true count."""
    from fedlora.client.train import noisy_label_counts

    labels = [0] * 300 + [1] * 700
    g = torch.Generator().manual_seed(3)
    draws = torch.stack([noisy_label_counts(labels, 2, 20.0, g) for _ in range(4000)])
    std = draws.std(0)
    assert torch.all((std - 20.0).abs() < 1.0), std
    error = (draws.mean(0) - torch.tensor([300.0, 700.0], dtype=torch.double)).abs()
    assert torch.all(error < 4 * 20 / 63), draws.mean(0)
    torch.testing.assert_close(
        noisy_label_counts(labels, 3), torch.tensor([300.0, 700.0, 0.0], dtype=torch.double)
    )


def test_label_log_prior_exact_and_floored() -> None:
    from fedlora.client.train import label_log_prior

    got = label_log_prior([0, 0, 0, 1], 3, tau=2.0)
    # counts (3, 1, 0) floored at 1 -> (3, 1, 1) / 5
    want = 2.0 * torch.log(torch.tensor([3 / 5, 1 / 5, 1 / 5]))
    torch.testing.assert_close(got, want)


def test_train_epochs_adds_the_log_prior_to_the_training_loss_only(tiny_model_dir: Path) -> None:
    """One SGD step with logit adjustment equals the hand-written step on
    cross_entropy(logits + log_prior); reported accuracy uses plain logits."""
    import copy

    from fedlora.client.train import train_epochs

    model = build_model(tiny_model_dir, 3, LORA, seed=0)
    for module in model.modules():  # the tiny BERT's hidden dropout: make both sides equal
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    reference = copy.deepcopy(model)
    ids = torch.tensor([[2, 40, 41, 42, 3], [2, 50, 51, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([0, 2])}
    prior = torch.tensor([-0.1, -2.0, -3.0])
    params = [p for p in model.parameters() if p.requires_grad]
    train_epochs(model, [batch], torch.optim.SGD(params, lr=0.5), 1, None, prior)  # type: ignore[arg-type]
    reference.train()
    out = reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    torch.nn.functional.cross_entropy(out.logits + prior, batch["labels"]).backward()
    moved = 0
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        if p.requires_grad:
            assert q.grad is not None, name
            torch.testing.assert_close(p.detach(), q.detach() - 0.5 * q.grad, atol=1e-6, rtol=1e-5)
            moved += int(q.grad.abs().max() > 0)
    assert moved > 0


def test_the_task_seam_names_its_tasks_and_refuses_others() -> None:
    from fedlora.errors import ConfigError
    from fedlora.models.task import CAUSAL_LM, SEQUENCE_CLASSIFICATION, get_task
    from fedlora.task_settings import TASK_NAMES

    assert get_task() is SEQUENCE_CLASSIFICATION
    assert get_task("causal-lm") is CAUSAL_LM
    assert tuple(TASKS_ORDER := ("classification", "causal-lm")) == TASK_NAMES
    with pytest.raises(ConfigError, match="task 'seq2seq' is not known; known tasks: classif"):
        get_task("seq2seq")
    assert TASKS_ORDER


def test_classification_loss_adds_the_prior_to_the_objective_only() -> None:
    # Logits [[2, 0], [0, 1]], labels [0, 0], prior [0, 3]: the objective is the
    # cross-entropy of [[2, 3], [0, 4]] = mean(log(1+e^1), log(1+e^4)); the
    # correct count reads the plain logits (row 0 right, row 1 wrong) = 1.
    import math
    from types import SimpleNamespace

    import torch

    from fedlora.models.task import classification_loss

    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])

    def model(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=logits)

    batch = {
        "input_ids": torch.zeros((2, 1), dtype=torch.long),
        "attention_mask": torch.ones((2, 1), dtype=torch.long),
        "labels": torch.tensor([0, 0]),
    }
    loss, correct = classification_loss(model, batch, torch.tensor([0.0, 3.0]))
    expected = (math.log(1 + math.e**1) + math.log(1 + math.e**4)) / 2
    assert abs(float(loss) - expected) < 1e-6
    assert correct == 1
