"""DP-SGD on a tiny BERT + LoRA: clipping against a slow reference, noise
statistics, device and fail-closed checks, config validation."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import warnings
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from transformers import BertConfig, BertForSequenceClassification

from fedlora.errors import ConfigError, PrivacyError
from fedlora.models.adapter import set_lora_a_trainable
from fedlora.models.pooling import install_pooling
from fedlora.privacy.accounting import epsilon, steps_per_round
from fedlora.privacy.dpsgd import (
    ReproducibleNoiseWarning,
    empty_batch_step,
    make_private,
    resolve_noise_multiplier,
    trainable_device,
)
from fedlora.privacy.settings import GRAD_SAMPLE_MODES, DPConfig, recipe_advice

DEVICE = torch.device("cpu")


def tiny_lora_model(seed: int = 0, pooling: str = "cls", pooling_layers: int = 1) -> Any:
    """Tiny BERT + LoRA, moved to its device *before* get_peft_model."""
    torch.manual_seed(seed)
    options: dict[str, Any] = {
        "vocab_size": 100,
        "hidden_size": 16,
        "num_hidden_layers": max(1, pooling_layers),
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "max_position_embeddings": 64,
        "num_labels": 3,
        # No dropout, so the reference sees the same function as Opacus.
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
    }
    base: Any = BertForSequenceClassification(BertConfig(**options))
    install_pooling(base, pooling, pooling_layers)
    base = base.to(DEVICE)  # move first...
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(base, lora)  # ...wrap second
    # lora_B starts at zero, which makes lora_A's gradient zero; give it
    # values so every adapter tensor is exercised.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.train()
    return model


def data(n: int, seed: int = 1) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 12), generator=g)
    return TensorDataset(ids, torch.randint(0, 3, (n,), generator=g))


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def wrap(model: nn.Module, n: int, batch: int, config: DPConfig, sigma: float, **kw):
    optimizer = torch.optim.SGD(trainable(model), lr=1.0)
    loader = DataLoader(data(n), batch_size=batch)
    return make_private(model, optimizer, loader, config, sigma, **kw)


def per_example_reference(
    model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, clip: float, denom: int
) -> tuple[list[torch.Tensor], list[float]]:
    """Clip each example's gradient (flat norm over all trainable tensors)
    one example at a time with plain autograd, sum, divide by ``denom``."""
    params = trainable(model)
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(len(ids)):
        model.zero_grad()
        logits = model(input_ids=ids[i : i + 1]).logits
        nn.functional.cross_entropy(logits, labels[i : i + 1]).backward()
        grads = [p.grad.detach().clone() for p in params if p.grad is not None]
        norm = math.sqrt(sum(float((g**2).sum()) for g in grads))
        norms.append(norm)
        factor = min(1.0, clip / (norm + 1e-6))  # Opacus' clip factor
        for acc, g in zip(total, grads, strict=True):
            acc += factor * g
    return [acc / denom for acc in total], norms


@pytest.fixture(scope="module")
def norms() -> dict[tuple[int, ...], float]:
    """Unclipped gradient norm of each example of ``data(16)``, by its ids."""
    x_all, y_all = data(16).tensors
    _, values = per_example_reference(tiny_lora_model(), x_all, y_all, 1e9, 1)
    return {tuple(x.tolist()): n for x, n in zip(x_all, values, strict=True)}


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_clipping_matches_per_example_reference(
    mode: str, norms: dict[tuple[int, ...], float]
) -> None:
    model = tiny_lora_model()
    reference = copy.deepcopy(model)
    clip = sorted(norms.values())[len(norms) // 2]  # half the examples exceed it
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=clip, grad_sample_mode=mode)
    with pytest.warns(UserWarning, match="no differential privacy"):
        private = wrap(model, 16, 4, config, 0.0)
    # The first Poisson batch with one clipped and one unclipped example.
    ids, labels = next(
        (x, y)
        for _ in range(20)
        for x, y in private.data_loader
        if len(x) >= 2  # Poisson sampling draws an empty batch about 1% of the time
        and min(norms[tuple(r.tolist())] for r in x) < clip
        and max(norms[tuple(r.tolist())] for r in x) > clip
    )
    before = [p.detach().clone() for p in private.optimizer.params]
    private.optimizer.zero_grad()
    logits = private.model(input_ids=ids).logits
    private.criterion(logits, labels).backward()
    private.optimizer.step()
    update = [b - p.detach() for b, p in zip(before, private.optimizer.params, strict=True)]

    expected, _ = per_example_reference(
        reference, ids, labels, clip, private.optimizer.expected_batch_size
    )
    assert private.optimizer.expected_batch_size == 4
    assert len(update) == 6  # 2 x (lora_A, lora_B) + classifier weight and bias
    for got, want in zip(update, expected, strict=True):
        assert want.abs().max() > 0  # every tensor really trained
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_mean_pooled_padded_batch_matches_per_example_reference(mode: str, layers: int) -> None:
    """The masked-mean pooler (packaged MiniLM's default) mixes tokens within an
    example only: Opacus' per-sample clipping must still match one-at-a-time
    autograd on a padded batch, where each example sees only its own tokens.
    With ``pooling-layers=2`` the head also reads the first layer's mean, handed
    over by a hook, so LoRA in both layers gets gradient through two paths."""
    model = tiny_lora_model(pooling="mean", pooling_layers=layers)
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (6, 10), generator=g)
    lengths = torch.tensor([10, 3, 7, 5, 10, 2])
    mask = (torch.arange(10)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    labels = torch.randint(0, 3, (6,), generator=g)
    norms = []
    for i in range(6):
        reference.zero_grad()
        out = reference(input_ids=ids[i : i + 1, : lengths[i]]).logits  # no padding at all
        nn.functional.cross_entropy(out, labels[i : i + 1]).backward()
        norms.append(math.sqrt(sum(float((p.grad**2).sum()) for p in trainable(reference))))
    clip = sorted(norms)[3]
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=clip, grad_sample_mode=mode)
    with pytest.warns(UserWarning, match="no differential privacy"):
        private = wrap(model, 16, 6, config, 0.0)
    before = [p.detach().clone() for p in private.optimizer.params]
    private.optimizer.zero_grad()
    logits = private.model(input_ids=ids, attention_mask=mask).logits
    private.criterion(logits, labels).backward()
    private.optimizer.step()
    update = [b - p.detach() for b, p in zip(before, private.optimizer.params, strict=True)]
    expected = [torch.zeros_like(p) for p in trainable(reference)]
    for i in range(6):
        reference.zero_grad()
        out = reference(input_ids=ids[i : i + 1, : lengths[i]]).logits
        nn.functional.cross_entropy(out, labels[i : i + 1]).backward()
        factor = min(1.0, clip / (norms[i] + 1e-6))
        for acc, p in zip(expected, trainable(reference), strict=True):
            acc += factor * p.grad / private.optimizer.expected_batch_size
    for got, want in zip(update, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_ffa_clips_over_b_and_head_only_and_never_moves_a(mode: str) -> None:
    """FFA-LoRA under DP-SGD (the RT recipe in docs/RESULTS.md): with A frozen,
    each example's clip norm must cover B and the head only (a norm that still
    counted A's gradient would over-clip), and a noisy step must leave every A
    bit-identical (noise on a frozen tensor would break FFA's exact mean)."""
    model = tiny_lora_model()
    set_lora_a_trainable(model, False)
    reference = copy.deepcopy(model)
    frozen_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    x_all, y_all = data(16).tensors
    _, norms = per_example_reference(reference, x_all, y_all, 1e9, 1)
    clip = sorted(norms)[8]  # half the examples exceed it
    full, _ = per_example_reference(tiny_lora_model(), x_all[:1], y_all[:1], 1e9, 1)
    assert len(full) == 6 and len(trainable(reference)) == 4  # A really left out
    config = DPConfig(noise_multiplier=1.0, max_grad_norm=clip, grad_sample_mode=mode)
    with pytest.warns(UserWarning, match="no differential privacy"):
        private = wrap(model, 16, 16, config, 0.0)
    private.optimizer.zero_grad()
    private.criterion(private.model(input_ids=x_all).logits, y_all).backward()
    before = [p.detach().clone() for p in private.optimizer.params]
    private.optimizer.step()
    update = [b - p.detach() for b, p in zip(before, private.optimizer.params, strict=True)]
    expected, _ = per_example_reference(reference, x_all, y_all, clip, 16)
    assert len(update) == 4  # 2 x lora_B + classifier weight and bias
    for got, want in zip(update, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # Now with noise: B and the head move, A does not.
    noisy = tiny_lora_model()
    set_lora_a_trainable(noisy, False)
    b_before = {n: p.detach().clone() for n, p in noisy.named_parameters() if "lora_B" in n}
    private = wrap(noisy, 16, 4, config, 1.0)
    for ids, labels in private.data_loader:  # Poisson: ~1% of batches are empty
        if len(labels) == 0:
            assert empty_batch_step(private.optimizer)
            continue
        private.optimizer.zero_grad()
        private.criterion(private.model(input_ids=ids).logits, labels).backward()
        private.optimizer.step()
    for name, param in noisy.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param.detach(), frozen_a[name]), name
        elif "lora_B" in name:
            assert not torch.equal(param.detach(), b_before[name]), name


def test_noise_std_is_sigma_clip_over_batch() -> None:
    """With zero gradients an SGD(lr=1) step moves each trainable coordinate
    by pure noise N(0, (sigma*C/B)^2). The sample std over n coordinates is
    then sigma*C/B * chi_n / sqrt(n), whose relative spread is about
    1/sqrt(2n). Pooling 20 steps of d=307 coordinates gives n=6140, spread
    0.9%, so the 5% tolerance is ~5.5 standard errors (false failure ~1e-7)
    while a wrong scale (e.g. dividing by the drawn batch size) or missing
    noise fails it."""
    sigma, clip, batch, steps = 1.3, 0.7, 16, 20
    config = DPConfig(noise_multiplier=sigma, max_grad_norm=clip)  # production RNG
    private = wrap(tiny_lora_model(), 64, batch, config, sigma)
    assert private.optimizer.expected_batch_size == batch
    changes = []
    loader = iter(private.data_loader)
    for _ in range(steps):
        ids, labels = next(loader, None) or next(iter(private.data_loader))
        before = torch.cat([p.detach().flatten() for p in private.optimizer.params])
        private.optimizer.zero_grad()
        loss = private.criterion(private.model(input_ids=ids).logits, labels)
        (loss * 0.0).backward()
        private.optimizer.step()
        after = torch.cat([p.detach().flatten() for p in private.optimizer.params])
        changes.append(after - before)
    noise = torch.cat(changes).double()
    expected = sigma * clip / batch
    assert noise.numel() == steps * 307
    assert abs(noise.std().item() / expected - 1) < 0.05
    assert abs(noise.mean().item()) < 5 * expected / math.sqrt(noise.numel())


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_an_empty_poisson_batch_still_releases_noise(mode: str) -> None:
    """The accountant prices every step as clipped sum + N(0, (sigma*C)^2),
    so an empty Poisson batch must move B and the head by noise of std
    sigma*C/B, not by an exact zero that reveals the batch was empty, and A
    (frozen, FFA) must not move. Statistics as in the test above: 20 steps
    pooled, spread ~1%, tolerance 5%."""
    sigma, clip, batch, steps = 1.3, 0.7, 16, 20
    model = tiny_lora_model()
    set_lora_a_trainable(model, False)
    frozen_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    config = DPConfig(noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode)
    private = wrap(model, 64, batch, config, sigma)
    changes = []
    for _ in range(steps):
        before = torch.cat([p.detach().flatten() for p in private.optimizer.params])
        assert empty_batch_step(private.optimizer)
        after = torch.cat([p.detach().flatten() for p in private.optimizer.params])
        changes.append(after - before)
    noise = torch.cat(changes).double()
    assert abs(noise.std().item() / (sigma * clip / batch) - 1) < 0.05
    for name, param in model.named_parameters():
        if "lora_A" in name:
            assert torch.equal(param.detach(), frozen_a[name]), name
    # A non-private optimizer never sees Poisson batches: nothing to do.
    plain = torch.optim.SGD(trainable(tiny_lora_model()), lr=1.0)
    assert empty_batch_step(plain) is False


def test_the_training_loop_takes_the_noise_step_of_an_empty_batch() -> None:
    """fedlora's own loop (train_epochs) on an empty Poisson batch: no
    forward pass, but the step is taken, so the adapter moves by noise."""
    from fedlora.client.train import train_epochs
    from fedlora.models.batches import collate

    private = wrap(tiny_lora_model(), 64, 16, DPConfig(noise_multiplier=1.0), 1.0)
    before = [p.detach().clone() for p in private.optimizer.params]
    result = train_epochs(private.model, [collate([])], private.optimizer, epochs=1)  # type: ignore[arg-type]
    assert result.steps == 1 and result.num_examples == 0
    for old, p in zip(before, private.optimizer.params, strict=True):
        assert not torch.equal(old, p.detach())


def _two_steps(config: DPConfig, **kw) -> torch.Tensor:
    private = wrap(tiny_lora_model(), 32, 8, config, 1.0, **kw)
    loader = iter(private.data_loader)
    for _ in range(2):
        ids, labels = next(loader)
        private.optimizer.zero_grad()
        private.criterion(private.model(input_ids=ids).logits, labels).backward()
        private.optimizer.step()
    return torch.cat([p.detach().flatten() for p in private.optimizer.params])


def test_seeded_rng_reproduces_and_warns_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = DPConfig(noise_multiplier=1.0, secure_rng=False)
    with caplog.at_level(logging.WARNING), pytest.warns(ReproducibleNoiseWarning):
        first = _two_steps(config, generator=torch.Generator().manual_seed(5))
    assert "SEEDED generator" in caplog.text
    with pytest.warns(ReproducibleNoiseWarning):
        again = _two_steps(config, generator=torch.Generator().manual_seed(5))
        other = _two_steps(config, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_secure_rng_is_unpredictable_and_turns_on_secure_noise() -> None:
    config = DPConfig(noise_multiplier=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReproducibleNoiseWarning)
        assert not torch.equal(_two_steps(config), _two_steps(config))
        private = wrap(tiny_lora_model(), 32, 8, config, 1.0)
    assert private.optimizer.secure_mode is True


def test_rng_options_must_fit_the_config() -> None:
    with pytest.raises(ConfigError, match="seeded generator"):
        wrap(
            tiny_lora_model(),
            32,
            8,
            DPConfig(noise_multiplier=1.0),
            1.0,
            generator=torch.Generator().manual_seed(0),
        )
    with pytest.raises(ConfigError, match=r"needs a seeded torch\.Generator"):
        wrap(
            tiny_lora_model(),
            32,
            8,
            DPConfig(noise_multiplier=1.0, secure_rng=False),
            1.0,
        )


def test_device_check_catches_models_moved_or_loaded_after_wrapping() -> None:
    model = tiny_lora_model()
    assert trainable_device(model) == DEVICE
    # Part of the model moved (or left lazily materialised) after
    # get_peft_model: the classifier head is on another device than the LoRA
    # tensors. Opacus would wrap it without complaint.
    model.base_model.model.classifier.modules_to_save["default"].to("meta")
    with pytest.raises(PrivacyError, match=r"opacus#820"):
        trainable_device(model)
    with pytest.raises(PrivacyError, match="move the base model to its device first"):
        wrap(model, 32, 8, DPConfig(noise_multiplier=1.0), 1.0)


def test_optimizer_with_stale_parameters_is_refused() -> None:
    model = tiny_lora_model()
    optimizer = torch.optim.SGD(trainable(model), lr=1.0)
    # What a late device move or lazy materialisation does: the module gets a
    # new Parameter object, the optimizer keeps the old one.
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    old = query.lora_A["default"].weight
    query.lora_A["default"].weight = nn.Parameter(old.detach().clone())
    loader = DataLoader(data(32), batch_size=8)
    with pytest.raises(PrivacyError, match="optimizer holds 1 trainable"):
        make_private(model, optimizer, loader, DPConfig(noise_multiplier=1.0), 1.0)


def test_unsupported_modules_fail_closed() -> None:
    model = tiny_lora_model().eval()
    with pytest.raises(PrivacyError, match="training mode"):
        wrap(model, 32, 8, DPConfig(noise_multiplier=1.0), 1.0)
    batch_norm = nn.Sequential(nn.Linear(12, 4), nn.BatchNorm1d(4)).train()
    optimizer = torch.optim.SGD(batch_norm.parameters(), lr=1.0)
    loader = DataLoader(TensorDataset(torch.randn(8, 12)), batch_size=4)
    with pytest.raises(PrivacyError, match="BatchNorm"):
        make_private(batch_norm, optimizer, loader, DPConfig(noise_multiplier=1.0), 1.0)


def test_opacus_failure_becomes_privacy_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from opacus import PrivacyEngine

    def unsupported(self: object, **kwargs: object) -> None:
        raise NotImplementedError("no grad sampler for this layer")

    monkeypatch.setattr(PrivacyEngine, "make_private", unsupported)
    with pytest.raises(PrivacyError, match="rather than run without DP"):
        wrap(tiny_lora_model(), 32, 8, DPConfig(noise_multiplier=1.0), 1.0)


def test_ledger_accounting_never_undercounts_what_opacus_ran() -> None:
    """100 examples, batch 16: Opacus samples at 1/7 < 16/100 and runs
    int(1/(1/7)) <= 7 steps, so the ledger's (16/100, 7) is an upper bound."""
    sigma = 1.0
    private = wrap(tiny_lora_model(), 100, 16, DPConfig(noise_multiplier=sigma), sigma)
    for ids, labels in private.data_loader:
        private.optimizer.zero_grad()
        private.criterion(private.model(input_ids=ids).logits, labels).backward()
        private.optimizer.step()
    [(ran_sigma, ran_rate, ran_steps)] = private.privacy_engine.accountant.history
    rate, steps = steps_per_round(100, 16, 1)
    assert ran_sigma == sigma and ran_rate <= rate and ran_steps <= steps
    ran = private.privacy_engine.get_epsilon(1e-5)
    assert ran <= epsilon([(sigma, rate, steps)], 1e-5, "rdp")


def test_private_training_unpacks_like_opacus() -> None:
    private = wrap(tiny_lora_model(), 32, 8, DPConfig(noise_multiplier=1.0), 1.0)
    model, optimizer, loader, engine = private
    assert (model, optimizer, loader, engine) == (
        private.model,
        private.optimizer,
        private.data_loader,
        private.privacy_engine,
    )


def test_resolve_noise_multiplier() -> None:
    assert resolve_noise_multiplier(DPConfig(noise_multiplier=0.8), 0.1, 50) == 0.8
    sigma = resolve_noise_multiplier(DPConfig(target_epsilon=3.0), 0.1, 50)
    assert 2.98 <= epsilon([(sigma, 0.1, 50)], 1e-5) <= 3.0
    per_round = resolve_noise_multiplier(DPConfig(target_epsilon=3.0), 0.1, 50, rounds=4)
    assert 2.98 <= epsilon([(per_round, 0.1, 50)] * 4, 1e-5) <= 3.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of privacy-noise-multiplier"),
        ({"noise_multiplier": 1.0, "target_epsilon": 3.0}, "exactly one of"),
        ({"noise_multiplier": 0.0}, "privacy-noise-multiplier=0.0"),
        ({"noise_multiplier": math.nan}, "privacy-noise-multiplier=nan"),
        ({"target_epsilon": -1.0}, "privacy-target-epsilon=-1.0"),
        ({"noise_multiplier": 1.0, "max_grad_norm": 0}, "privacy-max-grad-norm=0"),
        ({"noise_multiplier": 1.0, "delta": 1.0}, r"privacy-delta=1\.0"),
        ({"noise_multiplier": 1.0, "accountant": "gdp"}, "allowed: rdp, prv"),
        (
            {"noise_multiplier": 1.0, "grad_sample_mode": "ew"},
            "privacy-grad-sample-mode='ew'.*allowed: hooks, functorch, ghost",
        ),
        ({"noise_multiplier": 1.0, "secure_rng": "yes"}, "privacy-secure-rng='yes'"),
        ({"noise_multiplier": 1.0, "poisson_sampling": 1}, "allowed: true, false"),
    ],
)
def test_dpconfig_validation(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPConfig(**options)


def test_dpconfig_defaults_and_metadata() -> None:
    config = DPConfig(noise_multiplier=1.0)
    assert (config.grad_sample_mode, config.accountant, config.secure_rng) == (
        "hooks",
        "rdp",
        True,
    )
    assert all(f.metadata["key"].startswith("privacy-") for f in dataclasses.fields(config))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.noise_multiplier = 2.0  # type: ignore[misc]


def test_recipe_advice_names_the_fix_for_each_known_loss() -> None:
    assert recipe_advice("sgd", trains_lora_a=False) == []  # the documented recipe
    adam, both = recipe_advice("adamw", trains_lora_a=True)
    assert "optimizer=adamw" in adam and "optimizer=sgd" in adam
    assert "strategy=ffa-lora" in both
    assert recipe_advice("sgd", trains_lora_a=True) == [both]
