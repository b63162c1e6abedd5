"""Never worse than the start: the best round, and the divergence stop, by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedlora.server.watch import (
    BestRound,
    DivergenceWatch,
    RoundScore,
    load_best,
    majority_share,
)


def _feed(watch: DivergenceWatch, rows: list[tuple[float, float]]) -> list[str | None]:
    return [watch.observe(RoundScore(r, acc, loss)) for r, (acc, loss) in enumerate(rows)]


def test_best_round_is_highest_accuracy_then_lowest_loss_and_round_0_competes() -> None:
    watch = DivergenceWatch(factor=0, patience=1)
    _feed(watch, [(0.5, 1.0), (0.7, 0.9), (0.7, 0.8), (0.6, 0.5)])
    assert watch.best == RoundScore(2, 0.7, 0.8)  # ties on accuracy go to the lower loss
    worse = DivergenceWatch(factor=0, patience=1)
    _feed(worse, [(0.5, 1.0), (0.4, 1.2), (0.45, 1.1)])
    assert worse.best is not None and worse.best.server_round == 0  # never worse than start


def test_loss_above_factor_times_round_0_for_patience_rounds_stops() -> None:
    watch = DivergenceWatch(factor=3.0, patience=2)
    # round 0 loss 1.6: the threshold is 4.8. Round 2 alone is not enough (streak 1),
    # round 3 recovers (streak reset), rounds 4 and 5 diverge: stop at round 5.
    rows = [(0.3, 1.6), (0.5, 1.2), (0.3, 5.0), (0.5, 1.1), (0.2, 9.0), (0.2, 16.0)]
    reasons = _feed(watch, rows)
    assert reasons[:5] == [None] * 5
    assert reasons[5] is not None
    assert "global loss 16.0000 > 3 x round 0's 1.6000 for 2 round(s)" in reasons[5]
    # equal accuracy 0.5 in rounds 1 and 3: the lower loss (round 3, 1.1) is the best
    assert "best round, 3 (global accuracy 0.5000, loss 1.1000)" in reasons[5]
    assert watch.best == RoundScore(3, 0.5, 1.1)


def test_collapse_to_one_class_counts_only_when_the_start_was_better() -> None:
    watch = DivergenceWatch(factor=3.0, patience=2, majority_share=0.33)
    reasons = _feed(watch, [(0.6, 1.0), (0.33, 1.5), (0.30, 1.4)])
    assert reasons[2] is not None and "always answering one class" in reasons[2]
    start_low = DivergenceWatch(factor=3.0, patience=2, majority_share=0.33)
    assert _feed(start_low, [(0.2, 1.0), (0.3, 1.5), (0.3, 1.4)]) == [None, None, None]


def test_factor_0_never_stops() -> None:
    watch = DivergenceWatch(factor=0.0, patience=1)
    assert _feed(watch, [(0.5, 1.0), (0.0, 100.0), (0.0, 1000.0)]) == [None, None, None]


def test_majority_share_by_hand() -> None:
    assert majority_share([0, 1, 1, 2]) == pytest.approx(0.5)
    assert majority_share([]) is None


def test_best_adapter_survives_a_restart_and_export_choice(tmp_path: Path) -> None:
    state = {"a.lora_B.weight": np.arange(4, dtype=np.float32).reshape(2, 2)}
    keeper = BestRound(tmp_path, DivergenceWatch(factor=0, patience=1))
    keeper.observe(0, 0.5, 1.0, {"a.lora_B.weight": np.zeros((2, 2), np.float32)})
    keeper.observe(1, 0.8, 0.7, state)
    keeper.observe(2, 0.6, 0.9, {"a.lora_B.weight": np.ones((2, 2), np.float32)})
    saved = load_best(tmp_path)
    assert saved is not None and saved[0] == 1
    np.testing.assert_array_equal(saved[1]["a.lora_B.weight"], state["a.lora_B.weight"])
    # A resumed server rebuilds the watch from history and finds round 1's adapter.
    again = BestRound(tmp_path, DivergenceWatch(factor=0, patience=1))
    again.replay([(0, 0.5, 1.0), (1, 0.8, 0.7), (2, 0.6, 0.9)])
    last = {"a.lora_B.weight": np.full((2, 2), 9.0, np.float32)}
    rnd, chosen, why = again.choose("best", 2, last)
    assert rnd == 1 and "best" in why
    np.testing.assert_array_equal(chosen["a.lora_B.weight"], state["a.lora_B.weight"])
    assert again.choose("last", 2, last)[0] == 2


@pytest.mark.slow
@pytest.mark.integration
def test_an_unstable_rate_stops_the_run_and_exports_the_best_round(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """SGD at rate 100 on the tiny model: loss 1.10 -> ~50 -> ~17 (measured); the run
    stops after round 2 and exports round 0's adapter, the best it saw."""
    import json

    from safetensors.numpy import load_file

    from fedlora.models.adapter import adapter_state
    from fedlora.models.loading import build_model
    from fedlora.settings import LoraSettings
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.report import summary_table
    from fedlora.simulations.tiny import tiny_run_config

    run_dir = tmp_path / "run"
    cfg = tiny_run_config(
        tiny_model_dir,
        text_csv,
        run_dir,
        **{"num-server-rounds": 5, "optimizer": "sgd", "learning-rate": 100.0},
        **{"divergence-factor": 3.0},  # the default, which tiny_run_config turns off
        **{"update-max-norm": 1e9},  # let the bad updates through: the watch must act
    )
    status = simulate(cfg, 2, Resources(num_cpus=1))
    assert status["status"] == "stopped", status
    assert "diverged" in status["reason"] and "The best round, 0" in status["reason"]
    assert status["exported_round"] == 0 and status["rounds_completed"] == 2
    meta = json.loads((run_dir / "adapter" / "fedlora_metadata.json").read_text())
    assert meta["exported_round"] == 0 and meta["rounds_completed"] == 2
    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    lora = LoraSettings(rank=4, alpha=8.0, dropout=0.0)
    initial = adapter_state(build_model(tiny_model_dir, 3, lora, seed=cfg["seed"]))
    assert len(exported) == len(initial)
    for key, value in initial.items():  # PEFT drops the adapter name in saved keys
        saved = next(v for k, v in exported.items() if k.endswith(key.split("base_model.")[-1]))
        np.testing.assert_array_equal(saved, value)
    assert "exported adapter: round 0" in summary_table(run_dir)
