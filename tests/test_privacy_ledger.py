"""The on-disk privacy ledger: persistence, isolation, atomicity, budget."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from fedlora.errors import ConfigError, DataError, PrivacyBudgetExceeded, PrivacyError
from fedlora.privacy.accounting import epsilon
from fedlora.privacy.ledger import BudgetExceeded, PrivacyLedger
from fedlora.privacy.ledger_files import dataset_fingerprint, ledger_key

ROUND = (1.0, 0.05, 40)  # noise multiplier, sample rate, steps
FP = "sha256:" + "ab" * 32


def _open(
    folder: Path, federation: str = "fed-a", fingerprint: str = FP, **kw: object
) -> PrivacyLedger:
    options = {"delta": 1e-5, "accountant": "rdp", **kw}
    return PrivacyLedger.open(folder, federation, fingerprint, **options)  # type: ignore[arg-type]


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_new_ledger_is_written_at_once_and_spends_nothing(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    assert ledger.spent_epsilon() == 0.0
    assert ledger.path == tmp_path / f"{ledger_key('fed-a', FP)}.json"
    on_disk = json.loads(ledger.path.read_text())
    assert on_disk["rounds"] == [] and on_disk["epsilon_spent"] == 0.0


def test_restart_reports_identical_epsilon(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    for server_round, entry in enumerate([ROUND, (1.2, 0.05, 40), ROUND], start=1):
        ledger.record_round(server_round, *entry)
    spent = ledger.spent_epsilon()

    reopened = _open(tmp_path)  # a new process reading the same disk
    assert reopened.spent_epsilon() == spent
    assert reopened.rounds == ledger.rounds
    assert [r.server_round for r in reopened.rounds] == [1, 2, 3]
    assert spent == epsilon([ROUND, (1.2, 0.05, 40), ROUND], 1e-5, "rdp")
    assert reopened.rounds[-1].epsilon_after == spent


def test_projection_composes_whole_history(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record_round(1, *ROUND)
    projected = ledger.projected_epsilon(*ROUND)
    assert projected == epsilon([ROUND, ROUND], 1e-5, "rdp")
    assert projected < ledger.spent_epsilon() + epsilon([ROUND], 1e-5, "rdp")


def test_two_federations_or_datasets_never_share_spend(tmp_path: Path) -> None:
    a = _open(tmp_path, "fed-a", FP)
    a.record_round(1, *ROUND)
    other_federation = _open(tmp_path, "fed-b", FP)
    other_dataset = _open(tmp_path, "fed-a", "sha256:" + "cd" * 32)
    assert other_federation.spent_epsilon() == 0.0
    assert other_dataset.spent_epsilon() == 0.0
    other_federation.record_round(1, *ROUND)
    other_federation.record_round(2, *ROUND)
    assert _open(tmp_path, "fed-a", FP).spent_epsilon() == a.spent_epsilon()
    assert len({a.path, other_federation.path, other_dataset.path}) == 3


def test_ledger_key_is_a_safe_unambiguous_file_name() -> None:
    key = ledger_key("fed/../x", "sha256:00")
    assert key == ledger_key("fed/../x", "sha256:00")
    assert key.startswith("ledger-") and all(c.isalnum() or c == "-" for c in key)
    assert ledger_key("a|b", "c") != ledger_key("a", "b|c")
    with pytest.raises(ConfigError, match="non-empty"):
        ledger_key("", FP)


def test_dataset_fingerprint_hashes_streamed_content(tmp_path: Path) -> None:
    content = os.urandom(2_500_000)  # spans several read chunks
    first, second, third = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    first.write_bytes(content)
    second.write_bytes(content)
    third.write_bytes(content[:-1] + bytes([content[-1] ^ 1]))
    expected = "sha256:" + hashlib.sha256(content).hexdigest()
    assert dataset_fingerprint(first) == dataset_fingerprint(second) == expected
    assert dataset_fingerprint(third) != expected
    with pytest.raises(DataError, match=r"missing\.csv"):
        dataset_fingerprint(tmp_path / "missing.csv")


def test_interrupted_replace_leaves_old_ledger_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = _open(tmp_path)
    ledger.record_round(1, *ROUND)
    before_bytes = ledger.path.read_bytes()
    before_files = _files(tmp_path)

    def crash(src: str, dst: str) -> None:
        raise OSError("simulated power loss during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(PrivacyError, match="must not be sent"):
        ledger.record_round(2, *ROUND)
    monkeypatch.undo()

    assert ledger.path.read_bytes() == before_bytes
    assert _files(tmp_path) == before_files  # the temporary file is gone
    assert len(ledger.rounds) == 1  # memory agrees with disk
    assert _open(tmp_path).rounds == ledger.rounds
    ledger.record_round(2, *ROUND)  # and the ledger still works
    assert len(_open(tmp_path).rounds) == 2


def _corrupt_cases(state: dict) -> list[tuple[str, str]]:
    def edited(**changes: object) -> str:
        return json.dumps({**state, **changes})

    round0 = state["rounds"][0]
    return [
        ("", "cannot be read"),
        ('{"version": 1, "rounds": [', "cannot be read"),
        ("[1, 2, 3]", "not a version-1"),
        (edited(version=99), "not a version-1"),
        (edited(delta="1e-5"), "delta='1e-5' is not a float"),
        (edited(federation="fed-x"), "does not match"),
        (edited(rounds=[{**round0, "steps": "forty"}]), "steps='forty'"),
        (edited(rounds=[{**round0, "noise_multiplier": -1.0}]), "inconsistent"),
        (edited(rounds=[{"server_round": 1}]), "must have the fields"),
        (edited(accountant="gdp"), "inconsistent"),
    ]


def test_corrupt_ledger_fails_closed(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record_round(1, *ROUND)
    state = json.loads(ledger.path.read_text())
    for text, message in _corrupt_cases(state):
        ledger.path.write_text(text)
        with pytest.raises(PrivacyError, match=message):
            _open(tmp_path)
        assert ledger.path.read_text() == text  # never silently replaced


def test_file_holding_another_ledger_is_refused(tmp_path: Path) -> None:
    mine = _open(tmp_path, "fed-a")
    theirs = _open(tmp_path, "fed-b")
    theirs.record_round(1, *ROUND)
    mine.path.write_bytes(theirs.path.read_bytes())
    with pytest.raises(PrivacyError, match="holds ledger"):
        _open(tmp_path, "fed-a")


@pytest.mark.parametrize(("option", "value"), [("delta", 1e-6), ("accountant", "prv")])
def test_reopening_with_other_delta_or_accountant_refuses(
    tmp_path: Path, option: str, value: object
) -> None:
    _open(tmp_path).record_round(1, *ROUND)
    with pytest.raises(PrivacyError, match="privacy-delta=1e-05 and privacy-accountant=rdp"):
        _open(tmp_path, **{option: value})  # type: ignore[arg-type]


def test_check_budget_refuses_and_leaves_ledger_unchanged(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record_round(1, *ROUND)
    spent = ledger.spent_epsilon()
    projected = ledger.projected_epsilon(*ROUND)
    assert ledger.check_budget(projected + 0.01, *ROUND) == projected
    before = ledger.path.read_bytes()

    cap = (spent + projected) / 2
    with pytest.raises(PrivacyBudgetExceeded) as caught:
        ledger.check_budget(cap, *ROUND)
    err = caught.value
    assert isinstance(err, BudgetExceeded)
    assert (err.spent, err.cap, err.projected) == (spent, cap, projected)
    assert str(err).startswith(f"privacy budget exhausted: spent ε={spent:.2f} of {cap:.2f}")
    assert "raise privacy-epsilon-cap in the node config" in str(err)
    assert ledger.path.read_bytes() == before
    assert len(ledger.rounds) == 1 and len(_open(tmp_path).rounds) == 1


def test_budget_message_and_pickling() -> None:
    err = BudgetExceeded(7.9, 8.0, 8.5)
    assert str(err) == (
        "privacy budget exhausted: spent ε=7.90 of 8.00, this round would cost "
        "0.60 (ε would reach 8.50); the node refuses now rather than stop part-way; "
        "the node operator can raise privacy-epsilon-cap in the node config, or the "
        "server lower num-server-rounds"
    )
    assert "the run's 3 remaining rounds would cost 0.60" in str(BudgetExceeded(7.9, 8.0, 8.5, 3))
    assert pickle.loads(pickle.dumps(BudgetExceeded(7.9, 8.0, 8.5, 3))).rounds == 3
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.spent, copy.cap, copy.projected, str(copy)) == (
        7.9,
        8.0,
        8.5,
        str(err),
    )


@pytest.mark.parametrize("cap", [0, -1.0, "8", True])
def test_bad_cap_is_a_config_error(tmp_path: Path, cap: object) -> None:
    with pytest.raises(ConfigError, match="privacy-epsilon-cap"):
        _open(tmp_path).check_budget(cap, *ROUND)  # type: ignore[arg-type]


def test_noiseless_round_can_never_fit_a_budget(tmp_path: Path) -> None:
    with pytest.raises(BudgetExceeded):
        _open(tmp_path).check_budget(1e9, 0.0, 0.05, 40)


def test_second_writer_is_detected(tmp_path: Path) -> None:
    first, second = _open(tmp_path), _open(tmp_path)
    first.record_round(1, *ROUND)
    with pytest.raises(PrivacyError, match="changed on disk"):
        second.record_round(1, *ROUND)
    assert len(_open(tmp_path).rounds) == 1


def test_state_dict_round_trip(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.record_round(3, *ROUND)
    state = json.loads(json.dumps(ledger.state_dict()))
    again = PrivacyLedger.from_state_dict(state, ledger.path)
    assert again.rounds == ledger.rounds
    assert again.spent_epsilon() == ledger.spent_epsilon()
    assert state["key"] == ledger.key and state["epsilon_spent"] == ledger.spent_epsilon()


def test_a_rounds_releases_are_recorded_in_one_write_as_if_one_by_one(tmp_path: Path) -> None:
    # Label counts (one full-batch Gaussian release at sigma 20) then DP-SGD:
    # one record_releases call must leave exactly the entries, and epsilons,
    # of two record_round calls, and the total equals one accountant call.
    labels, dpsgd = (20.0, 1.0, 1), ROUND
    together = _open(tmp_path / "a")
    projected = together.check_releases(1e9, [labels, dpsgd])
    spent = together.record_releases(3, [labels, dpsgd])
    assert projected == pytest.approx(spent, rel=1e-12)  # the check prices what is recorded
    apart = _open(tmp_path / "b")
    apart.record_round(3, *labels)
    assert apart.record_round(3, *dpsgd) == pytest.approx(spent, rel=1e-12)
    assert [r.history_entry for r in together.rounds] == [labels, dpsgd]
    assert [r.epsilon_after for r in together.rounds] == pytest.approx(
        [r.epsilon_after for r in apart.rounds], rel=1e-12
    )
    assert spent == pytest.approx(epsilon([labels, dpsgd], together.delta, "rdp"), rel=1e-12)
    assert _open(tmp_path / "a").spent_epsilon() == pytest.approx(spent, rel=1e-12)
    with pytest.raises(PrivacyError, match="no releases"):
        together.record_releases(4, [])
    with pytest.raises(PrivacyError, match="no releases"):
        together.check_releases(1e9, [])
