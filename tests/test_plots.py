"""Reports from a synthetic run directory: PNG plots, TensorBoard events, the CLI.

Fast: no simulation. The metrics are written by the real RunHistory, so a
change to its file format breaks these tests rather than the plots silently.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedlora.errors import DataError
from fedlora.server.history import RoundRecord, RunHistory
from fedlora.simulations.plots import (
    load_clients,
    load_partitions,
    load_rounds,
    partitions_spec,
    plot_specs,
    render,
    write_plots,
)
from fedlora.simulations.report import write_reports
from fedlora.simulations.tensorboard import write_tensorboard

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ACC = [0.25, 0.40, 0.55, 0.70]  # rounds 0..3
LOSS = [1.40, 1.10, 0.90, 0.70]
EPS = [0.5, 0.8, 1.1]  # rounds 1..3
BYTES = [1_000_000, 2_000_000, 3_000_000]
CLIENT_ACC = {1: [0.2, 0.5, 0.3], 2: [0.6, 0.4], 3: [0.9, 0.7, 0.8, 1.0]}


def write_run(run_dir: Path, epsilon: bool = True, clients: bool = True) -> Path:
    history = RunHistory(run_dir)
    history.add(RoundRecord(round=0, global_accuracy=ACC[0], global_loss=LOSS[0]))
    for r in (1, 2, 3):
        extra = {"train-time-s": 0.5 * r}
        if epsilon:
            extra["epsilon"] = EPS[r - 1]
        history.add(
            RoundRecord(
                round=r,
                global_accuracy=ACC[r],
                global_loss=LOSS[r],
                train_accuracy=ACC[r] - 0.05,
                train_loss=LOSS[r] + 0.1,
                clients_sampled=3,
                clients_ok=3,
                bytes_uploaded=BYTES[r - 1],
                seconds=2.0,
                extra=extra,
            )
        )
    if clients:
        rows = [
            {"round": r, "site": f"s{i}", "accuracy": a, "loss": 1 - a, "num_examples": 10}
            for r, accs in CLIENT_ACC.items()
            for i, a in enumerate(accs)
        ]
        (run_dir / "clients.json").write_text(json.dumps(rows))
    return run_dir


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, after checking the PNG signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_write_plots_writes_valid_pngs_of_the_expected_size(tmp_path: Path) -> None:
    import matplotlib.image

    paths = write_plots(write_run(tmp_path))
    names = sorted(p.name for p in paths)
    assert names == ["accuracy.png", "bytes.png", "clients.png", "epsilon.png", "loss.png"]
    for path in paths:
        assert png_size(path) == (700, 420)  # figsize 7 x 4.2 in at 100 dpi
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[:2] == (420, 700)
        assert pixels.std() > 0.01, f"{path.name} is blank"


def test_accuracy_plot_draws_every_round_exactly(tmp_path: Path) -> None:
    specs = {s.filename: s for s in plot_specs(load_rounds(write_run(tmp_path)))}
    acc = specs["accuracy.png"]
    glob, train = acc.series
    assert glob.x == (0.0, 1.0, 2.0, 3.0) and glob.y == tuple(ACC)
    assert train.x == (1.0, 2.0, 3.0)  # round 0 has no training
    fig = render(acc)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2
    np.testing.assert_allclose(lines[0].get_xydata(), np.column_stack([range(4), ACC]))
    assert fig.axes[0].get_xlabel() == "round"
    assert fig.axes[0].get_ylabel() == "accuracy"
    assert fig.axes[0].get_title()


def test_epsilon_and_bytes_and_client_spread_data(tmp_path: Path) -> None:
    run = write_run(tmp_path)
    specs = {s.filename: s for s in plot_specs(load_rounds(run), load_clients(run))}
    (eps,) = specs["epsilon.png"].series
    assert eps.label == "epsilon" and eps.x == (1.0, 2.0, 3.0) and eps.y == tuple(EPS)
    (mb,) = specs["bytes.png"].series
    assert mb.kind == "bar" and mb.y == (1.0, 2.0, 3.0)
    assert specs["bytes.png"].ylabel == "MB uploaded"
    band, dots, median = specs["clients.png"].series
    assert band.y == (0.2, 0.4, 0.7) and band.y2 == (0.5, 0.6, 1.0)
    assert len(dots.y) == 9
    assert median.y == pytest.approx((0.3, 0.5, 0.85))  # hand-computed medians


def test_optional_plots_skipped_and_stale_ones_removed(tmp_path: Path) -> None:
    write_plots(write_run(tmp_path))
    assert (tmp_path / "epsilon.png").is_file() and (tmp_path / "clients.png").is_file()
    (tmp_path / "clients.json").unlink()
    write_run(tmp_path, epsilon=False, clients=False)
    names = sorted(p.name for p in write_plots(tmp_path))
    assert names == ["accuracy.png", "bytes.png", "loss.png"]
    assert not (tmp_path / "epsilon.png").exists()
    assert not (tmp_path / "clients.png").exists()


def test_missing_metrics_is_an_actionable_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"metrics\.json does not exist"):
        write_plots(tmp_path)
    (tmp_path / "metrics.json").write_text("{}")
    (tmp_path / "clients.json").write_text('{"nope": 1}')
    with pytest.raises(DataError, match="not a fedlora metrics file"):
        write_plots(tmp_path)
    with pytest.raises(DataError, match="JSON list"):
        load_clients(tmp_path)


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_read_back_and_rewrite_cleanly(tmp_path: Path) -> None:
    folder = write_tensorboard(write_run(tmp_path))
    scalars = _scalars(folder)
    assert [s for s, _ in scalars["global/accuracy"]] == [0, 1, 2, 3]
    np.testing.assert_allclose([v for _, v in scalars["global/accuracy"]], ACC, rtol=1e-6)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    assert [s for s, _ in scalars["clients/ok"]] == [1, 2, 3]  # not 0 clients at round 0
    np.testing.assert_allclose([v for _, v in scalars["extra/epsilon"]], EPS, rtol=1e-6)
    assert "federated/accuracy" not in scalars  # never recorded, never invented
    # 4 global acc + 4 global loss + 3 rounds x (train acc, train loss, sampled, ok,
    # failed, bytes, seconds, train-time-s, epsilon)
    assert sum(len(v) for v in scalars.values()) == 8 + 3 * 9
    write_tensorboard(tmp_path)  # idempotent: no duplicated points, one events file
    assert _scalars(folder) == scalars
    assert len(list(folder.glob("events.out.tfevents.*"))) == 1


def test_write_reports_and_report_command(tmp_path: Path) -> None:
    from fedlora.cli.main import app

    result = write_reports(write_run(tmp_path))
    assert len(result["plots"]) == 5 and result["tensorboard"].is_dir()
    for png in tmp_path.glob("*.png"):
        png.unlink()
    out = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert out.exit_code == 0, out.output
    assert "0.7000" in out.output  # the summary table's final accuracy
    assert (tmp_path / "accuracy.png").is_file()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2


def test_partition_plot_stacks_each_clients_label_shares(tmp_path: Path) -> None:
    rows = [
        {"partition": 1, "examples": 4, "labels": {"fresh": 1, "rotten": 3}},
        {"partition": 0, "examples": 2, "labels": {"fresh": 2, "rotten": 0}},
    ]
    spec = partitions_spec(rows)
    fresh, rotten = spec.series
    assert (fresh.label, fresh.kind, fresh.x, fresh.y) == (
        "fresh",
        "stack",
        (0.0, 1.0),
        (1.0, 0.25),
    )
    assert rotten.y == (0.0, 0.75)
    assert spec.xticklabels == ("0\n2", "1\n4")  # client, examples
    bars = render(spec).axes[0].patches
    assert [round(b.get_y(), 6) for b in bars] == [0.0, 0.0, 1.0, 0.25]  # rotten sits on fresh
    run = write_run(tmp_path)
    (run / "partitions.json").write_text(json.dumps(rows))
    assert "partitions.png" in {p.name for p in write_plots(run)}
    assert png_size(run / "partitions.png") == (700, 420)
    (run / "partitions.json").write_text('{"labels": 1}')
    with pytest.raises(DataError, match="partition, examples, labels"):
        load_partitions(run)


def test_causal_lm_scores_and_perplexity_are_plotted_and_a_classifier_has_neither(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "lm"
    history = RunHistory(run_dir)
    scores = {0: (0.4, 0.0, 30.7), 1: (0.7, 0.5, 2.1), 2: (0.8, 0.75, 1.4)}
    for r, (choice, exact, ppl) in scores.items():
        extra = {"global_choice": choice, "global_exact_match": exact, "global_perplexity": ppl}
        history.add(RoundRecord(round=r, global_accuracy=choice, global_loss=1.0, extra=extra))
    specs = {s.filename: s for s in plot_specs(load_rounds(run_dir))}
    choice, exact = specs["generation.png"].series
    assert choice.label == "global_choice" and choice.y == (0.4, 0.7, 0.8)
    assert exact.x == (0.0, 1.0, 2.0) and exact.y == (0.0, 0.5, 0.75)
    assert specs["perplexity.png"].series[0].y == (30.7, 2.1, 1.4)
    written = {p.name for p in write_plots(run_dir)}
    assert {"generation.png", "perplexity.png"} <= written
    classifier = {s.filename for s in plot_specs(load_rounds(write_run(tmp_path / "cls")))}
    assert not {"generation.png", "perplexity.png"} & classifier
