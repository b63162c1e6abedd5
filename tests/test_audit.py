"""The membership audit: the ε-bound arithmetic by hand, an overfit adapter that
leaks, an adapter that never saw its members, and a broken "DP" claim."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest

from fedlora.privacy.audit_bound import (
    audit_threshold,
    bound_at,
    clopper_pearson_upper,
    epsilon_from_rates,
    roc_auc,
    tpr_at_fpr,
)


def test_the_bound_arithmetic_equals_the_hand_computed_values() -> None:
    # 0 errors in 50: the 97.5 % upper bound is 1 - 0.025^(1/50) = 0.07112
    assert clopper_pearson_upper(0, 50) == pytest.approx(1 - 0.025 ** (1 / 50), rel=1e-6)
    assert clopper_pearson_upper(0, 50) == pytest.approx(0.07112, abs=1e-5)
    assert clopper_pearson_upper(50, 50) == 1.0
    # both rates at 0.07112: ε >= log((1 - 1e-5 - 0.07112) / 0.07112) = log(13.061) = 2.5696
    assert epsilon_from_rates(0.07112, 0.07112, 1e-5) == pytest.approx(2.5696, abs=1e-3)
    # FPR 5 %, FNR 10 %: max(log(0.89999/0.05), log(0.94999/0.1)) = log(17.9998) = 2.8904
    assert epsilon_from_rates(0.05, 0.10, 1e-5) == pytest.approx(2.8904, abs=1e-4)
    # a test no better than chance proves nothing
    assert epsilon_from_rates(0.5, 0.5, 1e-5) == 0.0
    # 100 members scoring 1, 100 non-members 0: perfectly separated at t = 1
    b = bound_at(1.0, [1.0] * 100, [0.0] * 100, 1e-5)
    assert (b.false_positives, b.false_negatives, b.epsilon_point) == (0, 0, math.inf)
    upper = 1 - 0.025 ** (1 / 100)
    assert b.epsilon_lower_95 == pytest.approx(math.log((1 - 1e-5 - upper) / upper), rel=1e-6)
    assert roc_auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx(0.875)  # (1 + 1 + 1 + 0.5) / 4
    assert tpr_at_fpr([3.0, 2.0], [1.0, 2.0], 0.01) is None  # 2 non-members cannot show 1 %


def test_the_threshold_is_chosen_on_one_half_and_measured_on_the_other() -> None:
    rng = random.Random(0)
    same = [rng.random() for _ in range(400)]
    # scores from one distribution: nothing to find, the interval contains 0
    assert audit_threshold(same[:200], same[200:], 1e-5).epsilon_lower_95 == 0.0
    apart = [1.0 + rng.random() for _ in range(200)]
    bound = audit_threshold(apart, same[:200], 1e-5)
    assert (bound.members, bound.non_members) == (100, 100)  # the second halves
    assert bound.epsilon_lower_95 > 3.0


def _random_label_csv(path: Path, n: int) -> Path:
    """Texts of random words with random labels: only memorising fits them."""
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = ["".join(rng.choices(letters, k=6)) for _ in range(2000)]  # distinct texts
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(n):
            writer.writerow([" ".join(rng.choices(words, k=8)), rng.choice("abc")])
    return path


@pytest.fixture(scope="module")
def overfit_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site memorising 30 random labels with the packaged MiniLM (the
    16-wide tiny BERT cannot memorise enough to show a bound)."""
    from fedlora.simulations.engine import Resources, simulate
    from fedlora.simulations.tiny import tiny_run_config

    root = tmp_path_factory.mktemp("audit")
    data = _random_label_csv(root / "random.csv", 60)
    run_dir = root / "run"
    flat = tiny_run_config(
        tiny_model_dir,
        data,
        run_dir,
        **{
            "model-path": "",  # the packaged all-MiniLM-L6-v2
            "num-server-rounds": 1,
            "local-epochs": 40,
            "learning-rate": 0.003,
            "lora-rank": 16,
            "lora-alpha": 32,
            "min-train-nodes": 1,
            "update-max-norm": 1e6,  # memorising moves the adapter far
            "export-round": "last",
            "test-fraction": 0.5,
        },
    )
    # one site, so nothing averages its memorising away
    status = simulate(flat, 1, Resources(num_cpus=1))
    assert status["status"] == "completed", status
    return run_dir


@pytest.mark.slow
@pytest.mark.integration
def test_an_overfit_adapter_leaks_and_a_false_dp_claim_fails_the_audit(
    overfit_run: Path,
) -> None:
    from fedlora.simulations.audit import AUDIT_JSON, AUDIT_ROC, audit_run

    record = audit_run(overfit_run, progress=lambda _s: None)
    assert record["attacks"]["loss"]["auc"] > 0.9, record["attacks"]
    assert record["epsilon_lower_95"] > 0
    assert record["epsilon_accounted"] is None and record["passed"]  # no DP claimed
    assert (overfit_run / AUDIT_JSON).is_file() and (overfit_run / AUDIT_ROC).is_file()
    assert record["per_site"][0]["site"] == 0 and record["per_site"][0]["members"] == 30
    # "DP" with the noise off while site 0's ledger claims ε = 0.5 (what it reports
    # in clients.json): the audit sees exactly this adapter beside that claim and
    # must fail, naming the site and both numbers.
    clients = json.loads((overfit_run / "clients.json").read_text())
    for row in clients:
        row["epsilon"] = 0.5
    (overfit_run / "clients.json").write_text(json.dumps(clients))
    broken = audit_run(overfit_run, progress=lambda _s: None)
    assert broken["epsilon_accounted"] == 0.5
    assert not broken["passed"] and broken["epsilon_lower_95"] > 0.5
    site = broken["per_site"][0]
    assert site["epsilon_accounted"] == 0.5 and site["passed"] is False
    assert (
        f"site 0: empirical lower bound {site['epsilon_lower_95']:.2f} exceeds its accounted "
        "ε 0.50" in broken["failures"]
    )
    from fedlora.simulations.report import summary_table

    line = summary_table(overfit_run).splitlines()[-1]
    assert line.startswith("privacy audit: ε accounted 0.50 · empirical lower bound ")
    assert line.endswith("(95% confidence) · AUDIT FAILED")


@pytest.mark.slow
def test_members_the_model_never_saw_look_like_non_members(overfit_run: Path) -> None:
    """The run's *initial* adapter never saw any example: members and
    non-members score alike (AUC within 0.5 +- 0.2, ~2 sd at 30 a side)
    and the bound's interval contains 0."""
    from fedlora.models.loading import build_model, load_tokenizer
    from fedlora.simulations.audit import attack, losses, members_and_non_members, run_config_of

    cfg = run_config_of(overfit_run)
    members, non_members, _, owners = members_and_non_members(cfg, overfit_run, None, 400)
    assert owners == [0] * len(members)
    model = build_model(cfg.model_path or None, 3, cfg.lora, cfg.seed)
    tokenizer = load_tokenizer(cfg.model_path or None)
    scores = [[-v for v in losses(model, tokenizer, d, 32)] for d in (members, non_members)]
    result = attack(scores[0], scores[1], 1e-5)
    assert abs(result["auc"] - 0.5) < 0.2, result
    assert result["epsilon_lower_95"] == 0.0


def test_runs_that_cannot_be_audited_say_why(tmp_path: Path) -> None:
    from fedlora.errors import DataError
    from fedlora.simulations.audit import audit_run

    with pytest.raises(DataError, match="no config.json: not a fedlora run directory"):
        audit_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"dataset": "bbc-news"}))
    with pytest.raises(Exception, match="holds no exported adapter"):
        audit_run(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(DataError, match="has no partitions.json: a deployment's run"):
        audit_run(tmp_path)
    lm = {"task": "causal-lm", "dataset": "drug-sentiment"}
    (tmp_path / "config.json").write_text(json.dumps(lm))
    with pytest.raises(DataError, match=r"planted no canaries \(audit-canaries=0\)"):
        audit_run(tmp_path)


@pytest.mark.slow
def test_an_adapter_whose_labels_do_not_match_is_refused(overfit_run: Path) -> None:
    from fedlora.errors import DataError
    from fedlora.simulations.audit import audit_run

    labels = overfit_run / "adapter" / "fedlora_labels.json"
    original = labels.read_text()
    try:
        labels.write_text(json.dumps({"labels": ["c", "b", "a"]}))
        with pytest.raises(
            DataError, match=r"labels \['c', 'b', 'a'\] do not match the run's data"
        ):
            audit_run(overfit_run, progress=lambda _s: None)
    finally:
        labels.write_text(original)


def test_site_epsilons_read_simulated_site_keys_only(tmp_path: Path) -> None:
    from fedlora.protocol import partition_of_site_key, partition_site_key
    from fedlora.simulations.audit import site_epsilons

    assert partition_site_key(3) == "partition-000003"
    assert partition_of_site_key("partition-000003") == 3
    for name in ("hospital-a", "partition-", "partition-x1", "node-7"):
        assert partition_of_site_key(name) is None
    rows = [
        {"site": "partition-000001", "round": 1, "epsilon": 2.5},
        {"site": "partition-000001", "round": 2, "epsilon": 4.0},
        {"site": "partition-evil", "round": 1, "epsilon": 99.0},  # not a simulated key
        {"site": "partition-000002", "round": 1},  # no DP: no ε
    ]
    (tmp_path / "clients.json").write_text(json.dumps(rows))
    assert site_epsilons(tmp_path) == {1: 4.0}
