"""Moving code must not change results: seeded reduced runs equal the recorded fixture.

The fixture (``tests/fixtures/regression/expected.json``) was recorded with
``python tests/regression.py record`` before issue 18's restructuring; see
``tests/regression.py`` for the cases and what is compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from regression import CASES, FIXTURE, run_case, same


def test_the_comparison_tolerates_float_noise_and_nothing_else() -> None:
    assert same({"a": [1.0, 2.0]}, {"a": [1.0 + 1e-9, 2.0]}) == []
    assert same({"a": [1.0]}, {"a": [1.001]}) != []
    assert same({"a": "x"}, {"a": "y"}) != []
    assert same({"a": 1.0}, {"b": 1.0}) != []
    # a tensor's signed sum near zero: judged against its sum of magnitudes
    tensor = {"sum": 0.0534, "abs": 10.0, "sq": 2.0}
    assert same({**tensor, "sum": 0.05340007}, tensor) == []
    assert same({**tensor, "sum": 0.0536}, tensor) != []
    assert same({**tensor, "sq": 2.001}, tensor) != []


@pytest.mark.slow
@pytest.mark.integration
def test_seeded_runs_equal_the_recorded_fixture(tmp_path: Path) -> None:
    expected = json.loads(FIXTURE.read_text())
    assert sorted(expected) == sorted(CASES)
    for name in CASES:
        got = json.loads(json.dumps(run_case(name, tmp_path)))
        differences = same(got, expected[name])
        assert not differences, f"{name}: {differences[:5]}"
