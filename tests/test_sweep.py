"""Experiments and sweeps: TOML validation (fast) and a real two-cell sweep (slow)."""

from __future__ import annotations

import csv
import json
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedlora.errors import ConfigError
from fedlora.server.history import RoundRecord, RunHistory
from fedlora.simulations.plots import comparison_spec, load_rounds
from fedlora.simulations.sweep import (
    Sweep,
    cell_name,
    cell_summary,
    load_sweep,
    run_sweep,
    write_comparison,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return path


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------- fast
def test_unknown_grid_key_is_named(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[experiment]\nname = "x"\n[grid]\nlearning_rate = [0.1, 0.2]\n')
    with pytest.raises(ConfigError, match="unknown config key 'learning_rate'") as err:
        load_sweep(path)
    assert str(path) in str(err.value)
    assert "did you mean 'learning-rate'?" in str(err.value)


def test_experiment_key_in_grid_gets_a_hint(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'num-clients' \(it is an \[experiment\] key\)"):
        load_sweep(_toml(tmp_path, "[grid]\nnum-clients = [2, 3]\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nstrategy = 'fedavg'\n", "must be a non-empty list"),
        ("[grid]\nstrategy = []\n", "must be a non-empty list"),
        ("[config]\nrun-dir = 'x'\n", "set per cell by the sweep"),
        ("[config]\nrounds = 3\n", "unknown config key 'rounds'"),
        ("[experiment]\nclients = 3\n", r"unknown \[experiment\] key\(s\) clients"),
        ("[experiments]\nname = 'x'\n", r"unknown table\(s\) experiments"),
        ("[experiment]\nnum-clients = 'many'\n", "num-clients must be an integer"),
    ],
)
def test_malformed_sweep_files_are_rejected(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep(_toml(tmp_path, text))


def test_cells_are_the_grid_product_named_by_their_values(tmp_path: Path) -> None:
    sweep = load_sweep(
        _toml(
            tmp_path,
            '[experiment]\nname = "s"\nnum-clients = 4\n[config]\nnum-server-rounds = 2\n'
            '[grid]\nstrategy = ["fedavg", "fedmedian"]\ndirichlet-alpha = [0.1, 1.0]\n',
        )
    )
    assert sweep.num_clients == 4 and sweep.config == {"num-server-rounds": 2}
    assert [c.name for c in sweep.cells()] == [
        "strategy=fedavg__dirichlet-alpha=0.1",
        "strategy=fedavg__dirichlet-alpha=1.0",
        "strategy=fedmedian__dirichlet-alpha=0.1",
        "strategy=fedmedian__dirichlet-alpha=1.0",
    ]
    cell = sweep.cells()[2]
    assert sweep.overrides(cell, tmp_path / cell.name) == {
        "num-server-rounds": 2,
        "strategy": "fedmedian",
        "dirichlet-alpha": 0.1,
        "run-dir": str(tmp_path / cell.name),
    }
    assert cell_name({"model-path": "/a b/c"}) == "model-path=a_b_c"
    assert [c.name for c in Sweep("only").cells()] == ["only"]


def test_a_bad_cell_fails_before_anything_runs(tmp_path: Path) -> None:
    sweep = Sweep("s", num_clients=3, grid={"strategy": ["fedavg", "fedmagic"]})
    with pytest.raises(ConfigError, match="cell strategy=fedmagic: .*'fedmagic'"):
        run_sweep(sweep, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    too_few = Sweep("s", num_clients=2, grid={"min-train-nodes": [2, 3]})
    with pytest.raises(ConfigError, match="min-train-nodes=3 exceeds num-clients=2"):
        too_few.validate(tmp_path)


def test_comparison_from_finished_cells(tmp_path: Path) -> None:
    sweep = Sweep("s", grid={"strategy": ["fedavg", "fedmedian"]})
    rows = []
    for offset, cell in zip((0.0, 0.1), sweep.cells(), strict=True):
        history = RunHistory(tmp_path / cell.name)
        for r, acc in enumerate((0.3, 0.6, 0.5)):
            history.add(
                RoundRecord(
                    round=r,
                    global_accuracy=acc + offset,
                    global_loss=1.0 - acc,
                    bytes_uploaded=100 * r,
                    extra={"epsilon": 0.5 * r} if r else {},
                )
            )
        rows.append({"cell": cell.name, **cell.values, "wall_seconds": 1.0, "status": "done"})
    write_comparison(sweep, tmp_path, rows)
    with (tmp_path / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [t["cell"] for t in table] == ["strategy=fedavg", "strategy=fedmedian"]
    assert list(table[0])[:2] == ["cell", "strategy"]
    assert _png_size(tmp_path / "comparison.png") == (700, 420)
    summary = cell_summary(tmp_path / "strategy=fedmedian")
    assert summary["final_accuracy"] == pytest.approx(0.6)
    assert summary["best_accuracy"] == pytest.approx(0.7)  # round 0 does not count
    assert summary["total_bytes"] == 300 and summary["final_epsilon"] == 1.0


# ---------------------------------------------------------------- slow
@pytest.mark.slow
@pytest.mark.integration
def test_two_cell_sweep_writes_runs_csv_and_plots(
    tiny_model_dir: Path, text_csv: Path, tmp_path: Path
) -> None:
    """`fedlora sweep` on the tiny BERT: 2 cells x 3 clients x 2 rounds, real Flower + Ray."""
    import matplotlib.image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedlora.cli.main import app

    toml = _toml(
        tmp_path,
        f"""
[experiment]
name = "tiny"
num-clients = 3
num-cpus = 1.0

[config]
model-path = "{tiny_model_dir}"
dataset = "file"
data-file = "{text_csv}"
partitioner = "iid"
num-server-rounds = 2
lora-rank = 4
lora-alpha = 8
lora-dropout = 0.0
batch-size = 8
learning-rate = 0.01
max-seq-length = 32
min-train-nodes = 2
seed = 3

[grid]
strategy = ["fedavg", "fedmedian"]
""",
    )
    out = tmp_path / "sweep"
    result = CliRunner().invoke(app, ["sweep", str(toml), "--out", str(out)])
    assert result.exit_code == 0, result.output

    cells = ["strategy=fedavg", "strategy=fedmedian"]
    with (out / "comparison.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["cell"] for row in table] == cells
    assert [row["strategy"] for row in table] == ["fedavg", "fedmedian"]
    for name, row in zip(cells, table, strict=True):
        run_dir = out / name
        assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
        assert row["status"] == "completed"
        assert float(row["wall_seconds"]) > 0
        rounds = load_rounds(run_dir)
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert float(row["final_accuracy"]) == pytest.approx(rounds[-1]["global_accuracy"])
        assert float(row["final_loss"]) == pytest.approx(rounds[-1]["global_loss"])
        assert int(row["total_bytes"]) == sum(r["bytes_uploaded"] for r in rounds) > 0
        for png in ("accuracy.png", "loss.png", "bytes.png"):
            pixels = matplotlib.image.imread(run_dir / png)  # decodes, so a valid PNG
            assert pixels.shape[:2] == (420, 700)
        events = EventAccumulator(str(run_dir / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("global/accuracy")] == [0, 1, 2]
        assert len(events.Scalars("train/loss")) == 2

    assert _png_size(out / "comparison.png") == (700, 420)
    spec = comparison_spec([(name, load_rounds(out / name)) for name in cells])
    assert [s.label for s in spec.series] == cells
    assert all(len(s.x) == 3 for s in spec.series)  # rounds 0, 1, 2 per line
    assert json.loads((out / "sweep.json").read_text())["cells"] == cells
    assert "strategy=fedmedian" in result.output
