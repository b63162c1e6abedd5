"""SecAgg+ over adapter updates: the secure mean equals FedAvg within a stated bound.

The slow test runs a real Flower simulation (Ray, 4 virtual nodes, 2 rounds)
of :func:`fedlora.server.secagg.run_secagg_rounds` against
:func:`fedlora.client.secagg.build_secagg_client_app` with small numpy
"adapters" and a deterministic training function, then recomputes plain
FedAvg from the same inputs. In round 2 one node fails; SecAgg+ must unmask
the other three and the mean must be theirs. The fast tests check the pieces
by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.compat.common import recorddict_compat as compat

from fedlora.client import secagg as client_secagg
from fedlora.config import RunConfig
from fedlora.errors import ConfigError, DataError
from fedlora.server.secagg import aggregate_error_bound
from fedlora.server.secagg_flower import SecAggRound, SecAggSettings

NUM_NODES = 4
FAILING = (3, 2)  # (partition, round): this node fails in round 2
SETTINGS = SecAggSettings(clipping_range=0.5, max_weight=100.0, timeout=60.0)


def _initial() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    fan_in = 16
    return {
        "q.lora_A.weight": (rng.uniform(-1, 1, (4, fan_in)) / np.sqrt(fan_in)).astype(np.float32),
        "q.lora_B.weight": np.zeros((fan_in, 4), np.float32),
        "classifier.weight": rng.normal(0, 0.02, (3, fan_in)).astype(np.float32),
        "classifier.bias": np.zeros(3, np.float32),
    }


def _weight(partition: int) -> int:
    return 20 * (partition + 1)  # 20, 40, 60, 80: unequal, all <= max_weight


def _local_update(partition: int, server_round: int, state: dict[str, np.ndarray]):
    """A deterministic 'training' step: the global adapter plus a seeded nudge."""
    rng = np.random.default_rng([partition, server_round])
    return {
        k: (v + rng.uniform(-0.01, 0.01, v.shape) * (partition + 1)).astype(np.float32)
        for k, v in state.items()
    }


def _train_fn(state: dict[str, np.ndarray], config: dict[str, Any], context: Context):
    partition = int(context.node_config["partition-id"])
    server_round = int(config["server-round"])
    if (partition, server_round) == FAILING:
        raise DataError(f"site {partition}: data file vanished")
    trained = _local_update(partition, server_round, state)
    return trained, _weight(partition), {"loss": float(partition)}


def _exact_fedavg(state: dict[str, np.ndarray], server_round: int, partitions: list[int]):
    """Plain FedAvg of the same nodes' trained adapters, in float64."""
    total = sum(_weight(p) for p in partitions)
    out = {}
    for name, value in state.items():
        acc = np.zeros(value.shape, np.float64)
        for p in partitions:
            acc += _weight(p) * _local_update(p, server_round, state)[name].astype(np.float64)
        out[name] = acc / total
    return out


@pytest.mark.slow
@pytest.mark.integration
def test_secagg_mean_equals_fedavg_within_quantization_bound(tmp_path: Path) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedlora.server.secagg import run_secagg_rounds

    initial = _initial()
    rounds: list[SecAggRound] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_secagg_rounds(grid, initial, 2, rounds.append, SETTINGS, min_nodes=3, wait_timeout=60)

    run_simulation(
        server_app=server_app,
        client_app=client_secagg.build_secagg_client_app(_train_fn),
        num_supernodes=NUM_NODES,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": 2, "include_dashboard": False, "logging_level": "error"},
        },
    )
    assert [r.server_round for r in rounds] == [1, 2], "the ServerApp did not finish 2 rounds"
    first, second = rounds
    assert len(first.contributed) == NUM_NODES and first.failures == []
    # Round 2: the failing node dropped out and is named with its stage and reason.
    assert len(second.contributed) == NUM_NODES - 1
    assert len(second.failures) == 1
    assert "collect_masked_vectors: DataError: site 3: data file vanished" in second.failures[0]

    previous = initial
    for outcome in rounds:
        partitions = sorted(int(m["loss"]) for m in outcome.metrics.values())
        assert sorted(outcome.num_examples.values()) == [_weight(p) for p in partitions]
        assert all(m[client_secagg.METRIC_SECAGG_CLIPPED] == 0.0 for m in outcome.metrics.values())
        exact = _exact_fedavg(previous, outcome.server_round, partitions)
        max_update = max(
            float(np.max(np.abs(_local_update(p, outcome.server_round, previous)[k] - v)))
            for p in partitions
            for k, v in previous.items()
        )
        # The protocol's bound plus one float32 rounding of the result (|x| < 1).
        tolerance = (
            aggregate_error_bound([_weight(p) for p in partitions], max_update, SETTINGS) + 2.0**-24
        )
        assert tolerance < 1e-6  # what "within the quantization tolerance" means here
        unweighted = {
            k: np.mean([_local_update(p, outcome.server_round, previous)[k] for p in partitions], 0)
            for k in previous
        }
        for name, value in exact.items():
            got = outcome.state[name]
            assert got.dtype == np.float32
            gap = float(np.max(np.abs(got.astype(np.float64) - value)))
            assert gap <= tolerance, f"round {outcome.server_round} {name}: {gap} > {tolerance}"
            # The check can fail: ignoring the weights is off by far more.
            assert np.max(np.abs(unweighted[name] - value)) > 100 * tolerance
        previous = outcome.state


# ----------------------------------------------------------------- fast checks


def test_quantization_error_bound_by_hand() -> None:
    # 2 nodes with W examples each: entries step 2C/Q = 1/2**20 for C=2, Q=2**22,
    # error of the mean <= n * step / sum(dq) = 2 * 2**-20 / 2; weights exact.
    settings = SecAggSettings(clipping_range=2.0, max_weight=10.0)
    bound = aggregate_error_bound([10, 10], 1.0, settings)
    assert bound == pytest.approx(2**-20 + 2 * 1.0 / (2 * 2**22))
    # Overstating max_weight 100x: each weight is round(0.01 * 2**22) = 41943 levels,
    # so the entries' term grows ~100x and the weights' rounding is no longer negligible.
    loose = aggregate_error_bound([10, 10], 1.0, SecAggSettings(clipping_range=2.0, max_weight=1e3))
    assert loose == pytest.approx(2 * 4.0 / 2**22 / (2 * 41943 / 2**22) + 1 / 41943)
    assert loose > 90 * bound


def test_flower_quantization_round_trip_is_within_one_step() -> None:
    # The primitive the bound rests on: one node, stochastic rounding, |error| < 2C/Q.
    c, q = 0.5, 2**22
    x = np.random.default_rng(1).uniform(-c, c, 1000)
    back = dequantize(quantize([x], c, q), c, q)[0]
    assert np.max(np.abs(back - x)) < 2 * c / q


def test_settings_refuse_unsafe_or_unsummable_choices() -> None:
    with pytest.raises(ConfigError, match="lying server"):
        SecAggSettings(reconstruction_threshold=0.5)
    with pytest.raises(ConfigError, match="3 < threshold < 6"):
        SecAggSettings(num_shares=6, reconstruction_threshold=3)
    with pytest.raises(ConfigError, match="modulus_range"):
        SecAggSettings(quantization_range=2**32)
    with pytest.raises(ConfigError, match="at least 3"):
        SecAggSettings().check_nodes(2)
    with pytest.raises(ConfigError, match="wrap around"):
        SecAggSettings().check_nodes(1024)
    SecAggSettings().check_nodes(3)


def test_run_config_refuses_what_secagg_cannot_sum() -> None:
    """Each incompatibility is named with its key and value, all at once."""
    ok = {"secagg": True, "max-train-examples": 64, "min-train-nodes": 3}
    RunConfig.from_flat({**ok, "strategy": "ffa-lora"})  # a sum of B updates: fine
    with pytest.raises(ConfigError) as err:
        RunConfig.from_flat(
            {
                **ok,
                "strategy": "fedavgm",
                "strategy-options": "server-momentum=0.9",
                "compression": "int8",
                "min-train-nodes": 2,
            }
        )
    for part in ("strategy=fedavgm", "strategy-options=", "compression=int8", "min-train-nodes=2"):
        assert part in str(err.value)


def _fit_message(state: dict[str, np.ndarray], config: dict[str, Any]) -> Message:
    fitins = FitIns(ndarrays_to_parameters(list(state.values())), config)
    return Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=7, message_type="train")


def _context(partition: int = 0) -> Context:
    return Context(1, 7, {"partition-id": partition}, RecordDict(), {})


@pytest.mark.usefixtures("flower_task")
def test_fit_handler_sends_the_named_update_and_reports_clipping() -> None:
    state = {"a": np.zeros(4, np.float32), "b": np.ones((2, 2), np.float32)}
    config = {
        client_secagg.SECAGG_NAMES_KEY: json.dumps(list(state)),
        client_secagg.SECAGG_CLIPPING_KEY: 0.1,
        client_secagg.SECAGG_MAX_WEIGHT_KEY: 10.0,
        "server-round": 1,
    }

    def train(s: dict[str, np.ndarray], cfg: dict[str, Any], ctx: Context):
        assert cfg["server-round"] == 1 and client_secagg.SECAGG_NAMES_KEY not in cfg
        return {"a": s["a"] + np.array([0.05, 0.3, 0, 0], np.float32), "b": s["b"]}, 5, {}

    reply = client_secagg.secagg_fit_handler(train)(_fit_message(state, config), _context())
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    delta_a, delta_b = parameters_to_ndarrays(fitres.parameters)
    np.testing.assert_allclose(delta_a, [0.05, 0.3, 0, 0], rtol=1e-6)
    np.testing.assert_array_equal(delta_b, np.zeros((2, 2)))
    assert fitres.num_examples == 5
    # Weighted by 5/10 the limit is 0.1 / 0.5 = 0.2: one of 8 entries (0.3) is clipped.
    assert fitres.metrics[client_secagg.METRIC_SECAGG_CLIPPED] == pytest.approx(1 / 8)


@pytest.mark.usefixtures("flower_task")
def test_fit_handler_refuses_weights_above_max_weight_and_renamed_tensors() -> None:
    state = {"a": np.zeros(2, np.float32)}
    config = {client_secagg.SECAGG_NAMES_KEY: '["a"]', client_secagg.SECAGG_MAX_WEIGHT_KEY: 10.0}
    too_big = client_secagg.secagg_fit_handler(lambda s, c, x: (s, 11, {}))
    reply = too_big(_fit_message(state, config), _context())
    assert reply.has_error() and "max_weight is 10" in reply.error.reason
    renamed = client_secagg.secagg_fit_handler(lambda s, c, x: ({"z": s["a"]}, 1, {}))
    reply = renamed(_fit_message(state, config), _context())
    assert reply.has_error() and "missing ['a'], unexpected ['z']" in reply.error.reason


@pytest.mark.usefixtures("flower_task")
def test_node_requiring_secagg_refuses_a_plain_training_request() -> None:
    plain = Message(
        RecordDict({"arrays": ArrayRecord({"a": Array(np.zeros(2, np.float32))})}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
    )
    called: list[str] = []

    def train(msg: Message, ctx: Context) -> Message:
        called.append(msg.metadata.message_type)
        return Message(RecordDict({"c": ConfigRecord({"ok": 1})}), reply_to=msg)

    reply = client_secagg.secagg_mod(required=True)(plain, _context(), train)
    assert reply.has_error() and reply.error.code == client_secagg.ERROR_CODE_SECAGG_REQUIRED
    assert "only sends masked updates" in reply.error.reason and called == []
    # Queries pass; a node that does not require SecAgg+ trains in the clear.
    query = Message(RecordDict(), dst_node_id=7, message_type=MessageType.QUERY)
    assert not client_secagg.secagg_mod(required=True)(query, _context(), train).has_error()
    assert not client_secagg.secagg_mod(required=False)(plain, _context(), train).has_error()
    assert called == [MessageType.QUERY, MessageType.TRAIN]
    # By default the site decides, in its own node config.
    site_requires = Context(1, 7, {client_secagg.NODE_REQUIRE_SECAGG: True}, RecordDict(), {})
    assert client_secagg.secagg_mod()(plain, site_requires, train).has_error()
    assert not client_secagg.secagg_mod()(plain, _context(), train).has_error()


@pytest.mark.usefixtures("flower_task")
def test_fedlora_training_runs_inside_the_protocol(tiny_model_dir: Path, text_csv: Path) -> None:
    from fedlora.models.adapter import adapter_state
    from fedlora.models.loading import build_model
    from fedlora.settings import LoraSettings

    run_config = {
        "model-path": str(tiny_model_dir),
        "dataset": "file",
        "data-file": str(text_csv),
        "labels": "money,sport,tech",
        "lora-rank": 2,
        "lora-alpha": 4,
        "lora-dropout": 0.0,
        "batch-size": 16,
        "max-seq-length": 16,
        "max-train-examples": 32,
        "seed": 5,
    }
    from fedlora.client.app import train as handler

    model = build_model(tiny_model_dir, 3, LoraSettings(rank=2, alpha=4, dropout=0.0), seed=5)
    initial = adapter_state(model)
    config = {
        client_secagg.SECAGG_NAMES_KEY: json.dumps(list(initial)),
        client_secagg.SECAGG_CLIPPING_KEY: 1.0,
        client_secagg.SECAGG_MAX_WEIGHT_KEY: 100.0,
        "server-round": 1,
    }
    context = Context(1, 7, {"data-path": str(text_csv)}, RecordDict(), run_config)
    reply = client_secagg.fedlora_secagg_train(_fit_message(initial, config), context, handler)
    assert not reply.has_error(), reply.error.reason
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    deltas = parameters_to_ndarrays(fitres.parameters)
    assert [d.shape for d in deltas] == [v.shape for v in initial.values()]
    assert fitres.num_examples == 32
    assert any(np.abs(d).max() > 0 for d in deltas)  # it trained
    assert fitres.metrics[client_secagg.METRIC_SECAGG_CLIPPED] == 0.0
    assert {"loss", "accuracy"} <= set(fitres.metrics)
    # A broken site file comes back as fedlora's own error reply, not a crash.
    bad = Context(1, 7, {"data-path": str(text_csv) + ".missing"}, RecordDict(), run_config)
    reply = client_secagg.fedlora_secagg_train(_fit_message(initial, config), bad, handler)
    assert reply.has_error() and "does not exist" in reply.error.reason
