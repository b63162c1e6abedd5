"""The local-DP plan (fedlora.privacy.plan): σ, the noise-to-signal figures,
the auto recipe, the refusal of federations that cannot learn."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pytest

from fedlora.config import RunConfig
from fedlora.privacy.accounting import epsilon, steps_per_round
from fedlora.privacy.plan import (
    BATCH_CANDIDATES,
    CANNOT_LEARN,
    MIN_STEPS,
    effective_config,
    plan_federation,
    plan_site,
    site_sigma,
)
from fedlora.simulations.engine import Resources, simulate
from fedlora.simulations.tiny import tiny_run_config

MANUAL = {"dp-mode": "local", "dp-recipe": "manual", "optimizer": "sgd", "learning-rate": 4.0}


def _cfg(**flat: Any) -> RunConfig:
    return RunConfig.from_flat(flat)


def test_noise_to_signal_figures_equal_the_hand_computed_ones() -> None:
    # Fixed σ = 1, d = 10,000 noised coordinates, batch 64.
    cfg = _cfg(**MANUAL, **{"dp-noise-multiplier": 1.0, "batch-size": 64, "num-server-rounds": 4})
    one = plan_site(cfg, 640, 10_000, 1e-5)
    # q = 64/640 = 0.1, T = 10 steps; noise norm σ√d/B = 100/64 over a signal of at most 1
    assert (one.sample_rate, one.steps_per_round) == (0.1, 10)
    assert one.nsr_step == pytest.approx(1.5625)
    assert one.nsr_round == pytest.approx(1.5625 / math.sqrt(10))
    # Four equal sites, all in every round: the mean's noise falls as 1/sqrt(4)
    equal = plan_federation(cfg, [640] * 4, 10_000, advise=False)
    assert equal.nsr == pytest.approx(0.4941 / 2, abs=1e-4)
    # Sites of 640 and 320 examples (T = 10 and 5) at rate 4:
    # signal 4*10 + 4*5 = 60; noise sqrt((4*0.4941*10)^2 + (4*0.6988*5)^2) = 24.21
    mixed = plan_federation(cfg, [640, 320], 10_000, advise=False)
    assert mixed.sites_per_round == 2
    assert mixed.nsr == pytest.approx(24.21 / 60, abs=1e-3)


def _exact_gaussian_delta(eps: float, sigma: float) -> float:
    """δ(ε) of the Gaussian mechanism of sensitivity 1 and noise σ (Balle and
    Wang 2018, Theorem 8): Φ(1/2σ − εσ) − e^ε Φ(−1/2σ − εσ)."""
    phi = NormalDist().cdf
    return phi(0.5 / sigma - eps * sigma) - math.exp(eps) * phi(-0.5 / sigma - eps * sigma)


def test_sigma_spends_the_target_and_is_near_the_exact_gaussian_bound() -> None:
    # 96 examples, batch 128: q = 1, one step a round, 8 rounds, nothing else released.
    cfg = _cfg(**MANUAL, **{"dp-target-epsilon": 8.0, "batch-size": 128, "num-server-rounds": 8})
    sigma = site_sigma(cfg, 96, 128, 1e-5)
    assert 8.0 - 0.01 <= epsilon([(sigma, 1.0, 8)], 1e-5) <= 8.0
    # Eight full-batch Gaussian steps at σ are one Gaussian at σ/√8; RDP is an
    # upper bound, so that mechanism is (8, 1e-5)-DP exactly, and RDP's σ is
    # at most 25 % above the exact mechanism's (which leaks more at 0.8x).
    single = sigma / math.sqrt(8)
    assert _exact_gaussian_delta(8.0, single) <= 1e-5
    assert _exact_gaussian_delta(8.0, single * 0.8) > 1e-5
    # The planner's fast search agrees with the node's own within 1 %.
    fast = site_sigma(cfg, 96, 128, 1e-5, exact=False)
    assert fast == pytest.approx(sigma, rel=0.01)


def test_auto_recipe_picks_the_quietest_batch_and_scales_the_rate() -> None:
    cfg = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "num-server-rounds": 3})
    run = effective_config(cfg, 2000, 40_000, 1e-5)
    t = run.train
    # the slow reference: every allowed candidate, exact σ
    scores = {}
    for b in (b for b in BATCH_CANDIDATES if b <= min(2000 // MIN_STEPS, 128)):
        q, steps = steps_per_round(2000, b, 1)
        scores[b] = site_sigma(cfg, 2000, b, 1e-5) * math.sqrt(40_000) / (q * 2000 * steps**0.5)
    assert scores[t.batch_size] <= min(scores.values()) * 1.01
    assert t.optimizer == "sgd"
    assert t.batch_size == 128  # the quietest is the largest allowed: the reference
    assert t.learning_rate == pytest.approx(4.0)
    # below the reference the rate scales down with the batch (100 rows: at most 50)
    small = effective_config(cfg, 100, 40_000, 1e-5).train
    assert (small.batch_size, small.learning_rate) == (32, pytest.approx(1.0))
    # A frozen (FFA-LoRA) unless the operator chose a strategy other than the default
    assert run.strategy == "ffa-lora"
    krum = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "strategy": "krum"})
    assert krum.strategy == "krum"
    assert (
        _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "dp-recipe": "manual"}).strategy
        == "fedavg"
    )
    assert _cfg(**{"dp-mode": "local", "dp-noise-multiplier": 1.0}).strategy == "fedavg"
    # settings a person changed win; manual and fixed-noise runs are left alone
    mine = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "batch-size": 48})
    assert effective_config(mine, 2000, 40_000, 1e-5).train.batch_size == 48
    # a rate set by hand keeps its optimiser too (an AdamW rate means nothing to SGD)
    lr = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "learning-rate": 0.001})
    kept = effective_config(lr, 2000, 40_000, 1e-5).train
    assert (kept.learning_rate, kept.optimizer) == (0.001, "adamw")
    for flat in (
        {"dp-mode": "local", "dp-target-epsilon": 8.0, "dp-recipe": "manual"},
        {"dp-mode": "local", "dp-noise-multiplier": 1.0},
    ):
        fixed = _cfg(**flat)
        assert effective_config(fixed, 2000, 40_000, 1e-5) is fixed


def test_a_federation_of_tiny_sites_cannot_learn_and_the_plan_says_what_helps() -> None:
    cfg = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 1.0, "num-server-rounds": 8})
    tiny = plan_federation(cfg, [50] * 10, 40_000)
    assert tiny.verdict == "cannot-learn" and tiny.nsr >= CANNOT_LEARN
    assert "no dp-target-epsilon up to 64 is enough at these sizes" in tiny.advice
    assert any("sites per round (now 10)" in a for a in tiny.advice)
    small = plan_federation(cfg, [400] * 10, 40_000)
    assert small.verdict != "ok"
    # the suggested ε is enough, by the planner's own figures
    eps = float(next(a for a in small.advice if a.startswith("dp-target")).split("=")[1].split()[0])
    better = _cfg(**{"dp-mode": "local", "dp-target-epsilon": eps, "num-server-rounds": 8})
    assert plan_federation(better, [400] * 10, 40_000, advise=False).nsr < 1.0
    # large sites at ε = 8 are fine
    ok = _cfg(**{"dp-mode": "local", "dp-target-epsilon": 8.0, "num-server-rounds": 3})
    assert plan_federation(ok, [2000] * 10, 40_000).verdict == "ok"


def test_a_site_whose_cap_cannot_cover_the_run_is_named_at_the_start() -> None:
    cfg = _cfg(**MANUAL, **{"dp-noise-multiplier": 1.0, "batch-size": 16, "num-server-rounds": 8})
    site = plan_site(cfg, 160, 1000, 1e-5, cap=5.0)
    per_round = (1.0, 0.1, 10)
    # hand check: the affordable rounds fit, one more does not
    assert epsilon([per_round] * site.affordable_rounds, 1e-5) <= 5.0
    assert epsilon([per_round] * (site.affordable_rounds + 1), 1e-5) > 5.0
    assert 0 < site.affordable_rounds < 8
    plan = plan_federation(cfg, [160, 1600], 1000, cap=5.0)
    assert plan.advice[0].startswith(f"site 0: its cap affords {site.affordable_rounds} of 8")


@pytest.mark.slow
@pytest.mark.integration
def test_a_simulation_that_cannot_learn_stops_before_any_privacy_is_spent(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    flat = tiny_run_config(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{"dp-mode": "local", "dp-target-epsilon": 0.5, "dp-plan": "refuse"},
    )
    status = simulate(flat, 3, Resources(num_cpus=1))
    assert status["status"] == "stopped", status
    assert "cannot learn" in status["reason"] and "No privacy was spent" in status["reason"]
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["verdict"] == "cannot-learn" and len(plan["sites"]) == 3
    assert not (tmp_path / "ledgers").exists()  # no node ever trained
    # the same plan from the command line, exit 3
    result = subprocess.run(
        [sys.executable, "-m", "fedlora", "plan", "-n", "3"]
        + [f"-c{k}={v}" for k, v in flat.items()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    assert "cannot-learn" in result.stdout and "what would help:" in result.stdout


def test_the_memory_estimate_by_hand(tiny_model_dir: Path) -> None:
    from fedlora.simulations.memory import BASE_PROCESS, ModelShape, client_peak_bytes

    shape = ModelShape(parameters=1000, hidden=8, layers=2, heads=2, vocab=50)
    plain = _cfg(**{"batch-size": 4, "max-seq-length": 16})
    # 700 MB + 4 kB weights + 2 layers x (68*16*4*8 + 10*2*16*16*4)
    assert client_peak_bytes(plain, shape) == BASE_PROCESS + 4000 + 2 * (34816 + 20480)
    dp = _cfg(
        **{"batch-size": 64, "max-seq-length": 16, "dp-mode": "local"},
        **{"dp-noise-multiplier": 1.0, "dp-physical-batch-size": 4},
    )
    # the DP copy doubles the weights; the physical piece (4), not the batch (64),
    # sets the activations; per-example gradients 2 x 4 x 500 x 4 bytes
    assert client_peak_bytes(dp, shape, 500) == (BASE_PROCESS + 8000 + 2 * (34816 + 20480) + 16000)


@pytest.mark.slow
@pytest.mark.integration
def test_a_simulation_that_does_not_fit_in_memory_stops_before_round_one(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    flat = tiny_run_config(tiny_model_dir, text_csv, tmp_path, **{"sim-memory-gb": 1.0})
    status = simulate(flat, 3, Resources(num_cpus=1, total_cpus=2))
    assert status["status"] == "stopped", status
    reason = status["reason"]
    assert "needs about" in reason and "2 clients at once" in reason and "1.0 GB is" in reason
    assert not (tmp_path / "metrics.json").exists()  # no round ran


@pytest.mark.slow
@pytest.mark.integration
def test_nodes_train_with_the_recipe_the_plan_printed(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """dp-recipe=auto end to end: each node's ledger holds the sampling rate,
    steps and σ that plan.json planned for it (σ: the node's exact search
    against the plan's fast one, within 2 %), and its ε is the target's."""
    flat = tiny_run_config(
        tiny_model_dir,
        text_csv,
        tmp_path,
        **{"dp-mode": "local", "dp-target-epsilon": 8.0, "num-server-rounds": 1},
    )
    flat.pop("batch-size")  # leave the batch to the recipe
    flat.pop("learning-rate")
    status = simulate(flat, 3, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    plan = json.loads((tmp_path / "plan.json").read_text())
    # 32 examples a site: batches of at most 32 // 2, so 16 (q = 0.5, 2 steps)
    assert {(s["batch_size"], s["sample_rate"], s["steps_per_round"]) for s in plan["sites"]} == {
        (16, 0.5, 2)
    }
    ledgers = list((tmp_path / "ledgers").glob("ledger-*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        (entry,) = json.loads(path.read_text())["rounds"]
        assert (entry["sample_rate"], entry["steps"]) == (0.5, 2)
        assert entry["noise_multiplier"] == pytest.approx(
            plan["sites"][0]["noise_multiplier"], rel=0.02
        )
    rounds = json.loads((tmp_path / "metrics.json").read_text())["rounds"]
    assert 7.99 <= rounds[1]["extra"]["epsilon-max"] <= 8.0


def test_the_causal_lm_is_judged_on_its_own_calibration() -> None:
    """The LM demo's measured private runs (docs/RESULTS.md: 5 sites, 32 rows a
    round, SGD 0.5, batch 16, 3 rounds, d = 921,600): ε = 8 learned (perplexity
    30.7 -> 1.50) and plans ok; ε = 1 diverged and plans cannot-learn."""
    flat = {
        "task": "causal-lm",
        "dataset": "drug-sentiment",
        "num-server-rounds": 3,
        "max-train-examples": 32,
        **MANUAL,
        "learning-rate": 0.5,
        "batch-size": 16,
    }
    learned = plan_federation(_cfg(**flat, **{"dp-target-epsilon": 8.0}), [150] * 5, 921_600)
    # by hand: σ = 1.09, σ√d/B = 1.09 x 960 / 16 = 65.4 a step, /√2 steps, /√5 sites = 20.7
    assert (learned.verdict, round(learned.nsr, 1), learned.marginal) == ("ok", 20.7, 25.0)
    diverged = plan_federation(_cfg(**flat, **{"dp-target-epsilon": 1.0}), [150] * 5, 921_600)
    assert diverged.verdict == "cannot-learn"
