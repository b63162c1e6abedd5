"""The causal-LM task on a tiny Llama from a config, with SmolLM2's real tokenizer and template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lm_training import fit_full_batch

from fedlora.data.catalog import load_demo
from fedlora.errors import ModelError
from fedlora.models.adapter import adapter_state, trainable_state
from fedlora.models.batches import collate
from fedlora.models.causal_lm import (
    IGNORE,
    build_causal_lm,
    encode_instructions,
    fit,
    lm_evaluate,
    lm_loss,
    lm_model_folder,
)
from fedlora.models.loading import default_model_path, load_tokenizer
from fedlora.settings import LoraSettings
from fedlora.simulations.tiny import make_tiny_llama

LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def drug_rows() -> Any:
    return load_demo("drug-sentiment").subset(range(6))


def test_response_only_loss_mask_and_chat_template(tiny_folder: Path, drug_rows: Any) -> None:
    tok = load_tokenizer(tiny_folder)
    enc = encode_instructions(tok, drug_rows, 512)
    for i in range(len(drug_rows)):
        ids, targets, n = enc.input_ids[i], enc.targets[i], enc.prompt_lengths[i]  # type: ignore[index]
        assert targets[:n] == [IGNORE] * n
        assert targets[n:] == ids[n:]
        text = tok.decode(ids)
        assert text.startswith("<|im_start|>system\n")  # the model's own template
        assert tok.decode(ids[:n]).endswith("<|im_start|>assistant\n")
        gold = drug_rows.labels.names[drug_rows.label_ids[i]]
        assert tok.decode(ids[n:]) == f"{gold}<|im_end|>"


def test_fit_keeps_the_response_and_cuts_the_prompt_middle() -> None:
    prompt, response = list(range(100)), [900, 901]
    ids, n, cut = fit(prompt, response, 40)
    assert cut == "prompt" and len(ids) == 40 and n == 38
    assert ids[-2:] == response and ids[:22] == prompt[:22] and ids[22:38] == prompt[-16:]
    ids, n, cut = fit(list(range(10)), list(range(100, 200)), 40)
    assert cut == "response" and len(ids) == 40 and ids[:10] == list(range(10))
    assert fit([1, 2], [3], 8) == ([1, 2, 3], 2, "")


def test_encoder_folder_is_refused_under_causal_lm() -> None:
    with pytest.raises(ModelError, match="not a causal language model"):
        lm_model_folder(str(default_model_path()))


def test_tokenizer_without_chat_template_is_refused(tiny_folder: Path, drug_rows: Any) -> None:
    tok = load_tokenizer(tiny_folder)
    tok.chat_template = None
    with pytest.raises(ModelError, match="has no chat template"):
        encode_instructions(tok, drug_rows, 128)


def test_int4_base_is_refused_with_the_reason(tiny_folder: Path) -> None:
    import dataclasses

    with pytest.raises(ModelError, match="int4.*CUDA"):
        build_causal_lm(tiny_folder, 3, dataclasses.replace(LORA, base_quantization="int4"), 0)


def test_int8_base_keeps_int8_weights_and_trains_the_same_adapter(
    tiny_folder: Path, drug_rows: Any
) -> None:
    """torchao int8 under PEFT's LoRA: same payload, close logits, exact per-example grads."""
    import dataclasses

    from opacus import GradSampleModule
    from torchao.utils import TorchAOBaseTensor

    plain = build_causal_lm(tiny_folder, 3, LORA, 0).eval()
    q8 = build_causal_lm(tiny_folder, 3, dataclasses.replace(LORA, base_quantization="int8"), 0)
    q_proj = q8.get_base_model().model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.get_base_layer().weight, TorchAOBaseTensor)
    assert {k: v.shape for k, v in trainable_state(q8).items()} == {
        k: v.shape for k, v in trainable_state(plain).items()
    }  # what travels does not depend on how the base is stored
    enc = encode_instructions(load_tokenizer(tiny_folder), drug_rows, 256)
    batch = collate([enc[i] for i in range(4)], enc.pad_id)
    with torch.no_grad():
        a = plain(input_ids=batch["input_ids"]).logits
        b = q8.eval()(input_ids=batch["input_ids"]).logits
    # per-channel int8 rounding: a few percent of the logits' scale, never garbage
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())
    assert float((a - b).abs().max()) > 0  # it really is quantised
    q8.train()  # Opacus records activations in training mode only
    for name, p in q8.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    params = [(n, p) for n, p in q8.named_parameters() if p.requires_grad]
    slow = []
    for i in range(4):
        q8.zero_grad()
        lm_loss(q8, collate([enc[i]], enc.pad_id))[0].backward()
        slow.append({n: p.grad.detach().clone() for n, p in params})  # type: ignore[union-attr]
    q8.zero_grad()
    gsm = GradSampleModule(q8, loss_reduction="mean")
    lm_loss(gsm, batch)[0].backward()
    for name, p in params:
        for i in range(4):
            torch.testing.assert_close(
                p.grad_sample[i],
                slow[i][name],
                rtol=1e-3,
                atol=1e-6,  # type: ignore[attr-defined]
            )
    gsm._close()


def test_payload_is_only_lora_on_attention_and_training_lowers_loss(
    tiny_folder: Path, drug_rows: Any
) -> None:
    model = build_causal_lm(tiny_folder, 3, LORA, 0)
    state = trainable_state(model)
    assert state.keys() == adapter_state(model).keys()
    assert len(state) == 2 * 4 * 2  # (A, B) x (q, k, v, o) x 2 layers
    assert all(".lora_" in k and k.split(".")[-3][0] in "qkvo" for k in state)
    enc = encode_instructions(load_tokenizer(tiny_folder), drug_rows, 256)
    before, _acc, n = lm_evaluate(model, enc)
    assert n == len(drug_rows)
    fit_full_batch(model, collate([enc[i] for i in range(len(enc))], enc.pad_id), 1e-2, 10)
    after, _acc, _n = lm_evaluate(model, enc)
    assert after < before - 0.2  # measured 0.39 in 10 steps; no training leaves it equal


def test_loss_is_mean_of_per_example_means(tiny_folder: Path, drug_rows: Any) -> None:
    """Slow reference: each example alone, HF's own shifted cross-entropy on its response."""
    model = build_causal_lm(tiny_folder, 3, LORA, 0).eval()
    enc = encode_instructions(load_tokenizer(tiny_folder), drug_rows, 256)
    batch = collate([enc[i] for i in range(3)], enc.pad_id)
    fast, _ = lm_loss(model, batch)
    slow = []
    for i in range(3):
        ids = torch.tensor([enc.input_ids[i]])
        labels = torch.tensor([enc.targets[i]])  # type: ignore[index]
        slow.append(float(model(input_ids=ids, labels=labels).loss))
    assert float(fast) == pytest.approx(sum(slow) / 3, rel=1e-4)


def test_dp_per_example_gradients_match_a_slow_loop(tiny_folder: Path, drug_rows: Any) -> None:
    """Opacus' per-example gradients of the LoRA tensors equal one backward per example."""
    from opacus import GradSampleModule

    model = build_causal_lm(tiny_folder, 3, LORA, 0)
    for name, p in model.named_parameters():  # B starts at zero: give it signal
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    enc = encode_instructions(load_tokenizer(tiny_folder), drug_rows, 256)
    batch = collate([enc[i] for i in range(4)], enc.pad_id)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    slow = []
    for i in range(4):
        model.zero_grad()
        one = collate([enc[i]], enc.pad_id)
        lm_loss(model, one)[0].backward()
        slow.append({n: p.grad.detach().clone() for n, p in params})  # type: ignore[union-attr]
    model.zero_grad()
    gsm = GradSampleModule(model, loss_reduction="mean")
    loss, _ = lm_loss(gsm, batch)
    loss.backward()
    for name, p in params:
        per_example = p.grad_sample  # type: ignore[attr-defined]
        assert per_example.shape[0] == 4
        for i in range(4):
            torch.testing.assert_close(
                per_example[i], slow[i][name], rtol=1e-3, atol=1e-6
            )  # fp32 noise: 4e-7 seen
    gsm._close()


def test_export_reloads_with_plain_peft_to_identical_logits(
    tiny_folder: Path, drug_rows: Any, tmp_path: Path
) -> None:
    from peft import AutoPeftModelForCausalLM

    from fedlora.models.causal_lm import export_causal_lm

    model = build_causal_lm(tiny_folder, 3, LORA, 0)
    state = {k: v + 0.01 for k, v in adapter_state(model).items()}
    out = export_causal_lm(model, state, tmp_path / "adapter", ["negative", "neutral", "positive"])
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.tensor(
        [encode_instructions(load_tokenizer(tiny_folder), drug_rows, 128).input_ids[0]]
    )
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_task_settings_that_do_not_fit_are_named_in_one_error() -> None:
    from fedlora.config import RunConfig
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="task=causal-lm does not fit: ensemble=sites"):
        RunConfig.from_flat({"task": "causal-lm", "ensemble": "sites"})
    with pytest.raises(ConfigError, match="aclsum holds free-text summaries"):
        RunConfig.from_flat({"dataset": "aclsum"})
    with pytest.raises(ConfigError, match="only task=causal-lm quantises"):
        RunConfig.from_flat({"base-quantization": "int8"})
    with pytest.raises(ConfigError, match="'task' .*classification, causal-lm"):
        RunConfig.from_flat({"task": "seq2seq"})


def test_generative_metrics_by_hand_checks(tiny_folder: Path, drug_rows: Any) -> None:
    from fedlora.models.lm_eval import chosen_metrics, lm_metrics
    from fedlora.task_settings import LmSettings

    tok = load_tokenizer(tiny_folder)
    enc = encode_instructions(tok, drug_rows, 256)
    assert [tok.decode(c) for c in enc.choices] == [
        "negative<|im_end|>",
        "neutral<|im_end|>",
        "positive<|im_end|>",
    ]
    model = build_causal_lm(tiny_folder, 3, LORA, 0)
    settings = LmSettings(max_new_tokens=4)
    out = lm_metrics(model, enc, tok, settings, list(drug_rows.labels.names))
    loss, _acc, _n = lm_evaluate(model, enc)
    assert out["loss"] == pytest.approx(loss)
    assert 0 <= out["choice"] <= 1 and 0 <= out["exact-match"] <= 1 and out["perplexity"] > 1
    assert out["accuracy"] == out["choice"]
    with pytest.raises(Exception, match="free-text answers. Set labels="):
        chosen_metrics(LmSettings(lm_metrics=("choice",)), label_style=False)
    assert chosen_metrics(LmSettings(), label_style=False) == ("perplexity", "rouge-l")


def _sim_base(tiny_folder: Path) -> dict[str, Any]:
    """What both causal-LM simulations share: tiny Llama, drug reviews by condition."""
    return {
        "task": "causal-lm",
        "model-path": str(tiny_folder),
        "dataset": "drug-sentiment",
        "partitioner": "column",
        "num-server-rounds": 2,
        "lora-rank": 4,
        "lora-alpha": 8,
        "lora-dropout": 0.0,
        "batch-size": 4,
    }


@pytest.mark.slow
def test_real_flower_simulation_of_the_causal_lm(tiny_folder: Path, tmp_path: Path) -> None:
    """3 virtual clients, 2 rounds, task=causal-lm on drug reviews split by condition;
    20 canaries planted by the simulation and audited after the last round."""
    import json

    import numpy as np

    from fedlora.simulations.engine import Resources, simulate

    run_dir = tmp_path / "run"
    overrides = {
        **_sim_base(tiny_folder),
        "learning-rate": 0.01,
        "max-seq-length": 96,
        "max-train-examples": 8,
        "eval-max-examples": 12,
        "max-new-tokens": 4,
        "min-train-nodes": 3,
        "run-dir": str(run_dir),
        "seed": 3,
        "audit": True,
        "audit-canaries": 20,
        "audit-canary-repeats": 2,
    }
    status = simulate(overrides, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    # planted by the simulation: 8 drawn rows + 2 copies of the site's 7, 7, 6 canaries
    first = [c for c in json.loads((run_dir / "clients.json").read_text()) if c["round"] == 1]
    assert sorted(c["num_examples"] for c in first) == [20.0, 22.0, 22.0]
    audit = json.loads((run_dir / "audit.json").read_text())
    canaries = audit["canaries"]
    assert (canaries["planted"], canaries["held_out"], audit["members"]) == (20, 20, 20)
    assert audit["sites"] == [0, 1, 2] and audit["epsilon_accounted"] is None
    # 7, 7 and 6 canaries a site: too few for a per-site bound, and said so
    assert [(r["site"], r["members"]) for r in audit["per_site"]] == [(0, 7), (1, 7), (2, 6)]
    assert all("fewer than 20: no per-site bound" in r["skipped"] for r in audit["per_site"])
    assert all(0 <= r["exposure"] <= canaries["exposure_max"] for r in canaries["rows"])
    assert (run_dir / "audit_canaries.png").stat().st_size > 0
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["clients_ok"] == 3 for r in rounds[1:])
    for r in rounds:
        assert {"global_perplexity", "global_choice", "global_exact_match"} <= set(r["extra"])
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert "global_perplexity" in header and "global_choice" in header
    from safetensors.numpy import load_file

    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = [v for k, v in exported.items() if "lora_B" in k]
    assert b and any(float(np.abs(v).max()) > 0 for v in b)  # B starts at 0: it trained
    assert json.loads((run_dir / "adapter" / "fedlora_metadata.json").read_text())["task"] == (
        "causal-lm"
    )
    from fedlora.models.generation import generate_text

    prompt = "Is this review positive? 'Great drug.'"
    answer = generate_text(run_dir, prompt, max_new_tokens=3)
    assert isinstance(answer, str)  # plain PEFT reload + chat template + greedy decode
    from fedlora.models.predict import predict_file

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": prompt}) + "\n" + json.dumps({"prompt": prompt}))
    out = predict_file(run_dir, prompts, max_new_tokens=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["response"] for r in rows] == [answer, answer]  # same greedy path, batched
    with pytest.raises(ModelError, match="holds no exported adapter"):
        generate_text(tmp_path, "hi")


@pytest.mark.slow
def test_local_dp_simulation_of_the_causal_lm_is_accounted(
    tiny_folder: Path, tmp_path: Path
) -> None:
    """DP-SGD over prompt/response pairs through the real node code, priced by the ledger."""
    import json

    from fedlora.simulations.engine import Resources, simulate

    overrides = {
        **_sim_base(tiny_folder),
        "optimizer": "sgd",
        "learning-rate": 0.5,
        "max-seq-length": 96,
        "max-train-examples": 8,
        "eval-max-examples": 8,
        "max-new-tokens": 2,
        "min-train-nodes": 3,
        "run-dir": str(tmp_path / "run"),
        "seed": 3,
        "dp-mode": "local",
        "dp-noise-multiplier": 1.0,
        "sim-epsilon-cap": 50.0,
        "divergence-factor": 0,  # OS-seeded noise: this test is about accounting, not stopping
    }
    status = simulate(overrides, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    rounds = json.loads((tmp_path / "run" / "metrics.json").read_text())["rounds"]
    assert [r["clients_ok"] for r in rounds[1:]] == [3, 3]
    eps = [r["extra"]["epsilon-max"] for r in rounds[1:]]
    assert 0 < eps[0] < eps[1] < 50  # measured 5.38 then 7.41 (RDP, sigma=1, q=0.5)


#: One real simulation per row: every aggregation path, on the LM's adapters.
_LM_STRATEGIES = {
    "lora-exact+int8": {"strategy": "lora-exact", "compression": "int8"},
    "ffa-lora+secagg": {"strategy": "ffa-lora", "secagg": True},
    "hetero-rank+int4": {
        "strategy": "hetero-rank",
        "sim-client-ranks": "2,4,4",
        "compression": "int4",
    },
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(_LM_STRATEGIES))
def test_every_aggregation_path_serves_the_causal_lm(
    case: str, tiny_folder: Path, tmp_path: Path
) -> None:
    """lora-exact, ffa-lora over SecAgg+, hetero-rank, int8/int4 uploads: 3 sites, 1 round."""
    import io
    import json

    import numpy as np

    from fedlora.simulations.engine import Resources, simulate

    run_dir = tmp_path / "run"
    overrides = {
        **_sim_base(tiny_folder),
        **_LM_STRATEGIES[case],
        "num-server-rounds": 1,
        "learning-rate": 0.01,
        "max-seq-length": 64,
        "max-train-examples": 4,
        "eval-max-examples": 4,
        "lm-metrics": "perplexity",
        "min-train-nodes": 3,
        "run-dir": str(run_dir),
        "seed": 5,
    }
    status = simulate(overrides, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    rounds = json.loads((run_dir / "metrics.json").read_text())["rounds"]
    assert rounds[1]["clients_ok"] == 3 and "global_perplexity" in rounds[1]["extra"]
    raw = np.load(io.BytesIO((run_dir / "checkpoint" / "adapter.npz").read_bytes()))
    final = {k: raw[k] for k in raw.files}
    initial = adapter_state(build_causal_lm(tiny_folder, 3, LORA, overrides["seed"]))
    assert final.keys() == initial.keys()  # the global adapter keeps its full rank (4)
    moved = [k for k in final if not np.array_equal(final[k], initial[k])]
    assert any(".lora_B." in k for k in moved)  # B starts at zero: the round trained it
    if case.startswith("ffa-lora"):
        assert not any(".lora_A." in k for k in moved)  # A frozen, bit for bit, via SecAgg+


@pytest.mark.usefixtures("flower_task")
def test_fedavg_of_lm_adapters_is_the_hand_computed_weighted_mean(tiny_folder: Path) -> None:
    """Every q/k/v/o LoRA tensor of the tiny Llama: all 1s (4 examples) and all 5s
    (12 examples) average to (1*4 + 5*12) / 16 = 4 exactly."""
    import numpy as np
    from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict

    from fedlora.protocol import ARRAYS_KEY, METRIC_NUM_EXAMPLES
    from fedlora.strategies.registry import build_strategy

    shapes = {
        k: v.shape for k, v in trainable_state(build_causal_lm(tiny_folder, 3, LORA, 0)).items()
    }

    def reply(value: float, n: int) -> Message:
        arrays = ArrayRecord({k: Array(np.full(s, value, np.float32)) for k, s in shapes.items()})
        metrics = MetricRecord({METRIC_NUM_EXAMPLES: n})
        content = RecordDict({ARRAYS_KEY: arrays, "metrics": metrics})
        return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)

    arrays, _ = build_strategy("fedavg").aggregate_train(1, [reply(1.0, 4), reply(5.0, 12)])
    assert arrays is not None and set(arrays.keys()) == set(shapes)
    for key, shape in shapes.items():
        np.testing.assert_array_equal(arrays[key].numpy(), np.full(shape, 4.0, np.float32))
