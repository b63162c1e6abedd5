"""The ``fedlora`` command line: research commands (``simulate``, ``sweep``, ``report``).

Exit codes: 0 the run completed; 1 it failed; 2 bad input (config, paths);
3 it stopped early for a stated reason (e.g. too few nodes replied); 4 it
completed but some client replies failed.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fedlora.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SITES_FAILED,
    EXIT_STOPPED,
    parse_overrides,
)
from fedlora.cli.console import app as console_app
from fedlora.cli.ops import app as ops_app
from fedlora.errors import ConfigError as FedloraInputError
from fedlora.errors import FedloraError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="fedlora: private federated LoRA fine-tuning (Flower + PEFT + Opacus).",
)

# Deployment commands (certs, server, register, node, run) live in fedlora.cli.ops.
app.add_typer(ops_app)
app.add_typer(console_app)  # fedlora console (fedlora.cli.console)


#: ``-c key=value`` / ``-c file.toml``, shared by the commands that take a run config.
ConfigOption = Annotated[
    list[str] | None,
    typer.Option("-c", "--config", help="key=value or a TOML file; repeatable."),
]
NumClients = Annotated[int, typer.Option("--num-clients", "-n")]


@app.callback()
def _root() -> None:
    """fedlora: private federated LoRA fine-tuning (Flower + PEFT + Opacus)."""


@app.command()
def simulate(
    config: ConfigOption = None,
    num_clients: NumClients = 10,
    num_cpus: Annotated[
        float, typer.Option(help="CPUs per virtual client (1 -> 2 clients on 2 cores).")
    ] = 1.0,
    num_gpus: Annotated[
        float, typer.Option(help="GPU fraction per virtual client (0.25 -> 4 share one).")
    ] = 0.0,
    ray_address: Annotated[
        str,
        typer.Option(
            help="Attach to an existing Ray cluster (its head's HOST:PORT) instead of "
            "starting Ray here; clients are placed across the cluster's nodes."
        ),
    ] = "",
    verbose: Annotated[
        bool,
        typer.Option(
            "-v", "--verbose", help="Show Flower's, Ray's and the libraries' logs here too."
        ),
    ] = False,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in run-dir from its last complete round.")
    ] = False,
) -> None:
    """Run a federated simulation of N virtual clients (Flower simulation engine)."""
    from fedlora.simulations.engine import Resources, resolve_config
    from fedlora.simulations.engine import simulate as run
    from fedlora.simulations.report import summary_table
    from fedlora.simulations.terminal import LOG_FILE, RoundDisplay, quiet_output

    try:
        overrides = parse_overrides(config or [])
        if resume:
            overrides["resume"] = True
        resources = Resources(num_cpus, num_gpus, ray_address=ray_address or None)
        if verbose:
            status = run(overrides, num_clients, resources, verbose)
        else:  # one progress display; everything else goes to <run-dir>/fedlora.log
            cfg = resolve_config(overrides)
            log_file = Path(cfg.run_dir).resolve() / LOG_FILE
            with quiet_output(log_file) as terminal:
                print(f"fedlora simulate · {num_clients} clients · log: {log_file}", file=terminal)
                with RoundDisplay(Path(cfg.run_dir).resolve(), cfg.num_server_rounds, terminal):
                    status = run(overrides, num_clients, resources, verbose)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    run_dir = Path(status["run_dir"])
    table = summary_table(run_dir)
    if table:
        typer.echo(table)
    state = status.get("status")
    failed = int(status.get("clients_failed") or 0)
    if state == "completed" and failed:
        typer.secho(
            f"completed, but {failed} client repl{'y' if failed == 1 else 'ies'} failed "
            f"(crash, timeout or refusal; reasons in {run_dir / 'metrics.csv'}) · results in "
            f"{run_dir}",
            fg=typer.colors.YELLOW,
            err=True,
        )
        raise typer.Exit(EXIT_SITES_FAILED)
    if state == "completed":
        typer.secho(f"completed · results in {run_dir}", fg=typer.colors.GREEN)
        raise typer.Exit(EXIT_OK)
    colour = typer.colors.YELLOW if state == "stopped" else typer.colors.RED
    typer.secho(f"run {state}: {status.get('reason', '')}", fg=colour, err=True)
    raise typer.Exit(EXIT_STOPPED if state == "stopped" else EXIT_FAILED)


@app.command()
def plan(
    config: ConfigOption = None,
    num_clients: NumClients = 10,
    site_examples: Annotated[
        str,
        typer.Option(
            help="Sites' training examples, comma-separated (a deployment's sites); "
            "default: the simulation's partitions of the config's data."
        ),
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Plan a local-DP run before any privacy is spent: each site's noise, batch
    and noise-to-signal ratio, the federation's, and what would help. Exit 3
    when the plan says the run cannot learn."""
    import json

    from fedlora.privacy.plan import plan_lines
    from fedlora.simulations.engine import resolve_config
    from fedlora.simulations.planning import make_plan, plan_record, simulation_sites

    try:
        cfg = resolve_config(parse_overrides(config or []))
        if cfg.privacy.dp_mode != "local":
            raise FedloraInputError("fedlora plan plans local DP: set -c dp-mode=local")
        sites, labels = simulation_sites(cfg, num_clients)  # labels: the config's data
        if site_examples:
            sites = _site_counts(site_examples)
        result = make_plan(cfg, sites, labels)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(
        json.dumps(plan_record(result), indent=2) if as_json else "\n".join(plan_lines(result))
    )
    raise typer.Exit(EXIT_OK if result.can_learn else EXIT_STOPPED)


def _rate(value: float | None) -> str:
    return "n/a (too few non-members)" if value is None else f"{value:.3f}"


def _site_counts(text: str) -> list[int]:
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise FedloraInputError(
            f"--site-examples={text!r}: give whole numbers >= 1, comma-separated, e.g. 230,230,180"
        )
    return counts


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A simulation's run directory.")],
    sites: Annotated[
        str, typer.Option(help="Sites whose training rows are the members, e.g. 0,3 (default all).")
    ] = "",
    max_examples: Annotated[int, typer.Option(help="Members (and non-members) at most.")] = 400,
) -> None:
    """Membership inference against the exported adapter (a causal LM: its planted
    canaries' exposure and extraction): AUC, TPR at low FPR and an empirical ε lower
    bound beside the ledger's ε (audit.json and plots). Exit 1 when the bound exceeds
    the accounted ε."""
    from fedlora.simulations.audit import audit_run, summary_line

    try:
        chosen = [int(v) for v in sites.split(",") if v.strip()] if sites else None
        record = audit_run(run_dir, chosen, max_examples, progress=typer.echo)
    except (FedloraError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    for name, result in record["attacks"].items():
        typer.echo(
            f"{name:>10}: AUC {result['auc']:.3f} · TPR@1% FPR "
            f"{_rate(result['tpr_at_fpr_1pct'])} · "
            f"ε lower bound {result['epsilon_lower_95']:.2f}"
        )
    typer.echo(summary_line(record))
    for row in record.get("per_site", []):
        claim = row.get("epsilon_accounted")
        detail = row.get("skipped") or f"lower bound {row['epsilon_lower_95']:.2f}"
        typer.echo(
            f"  site {row['site']}: {row['members']} members · ε accounted "
            f"{'∞ (no DP)' if claim is None else f'{claim:.2f}'} · {detail}"
        )
    if not record["passed"]:
        for line in record["failures"]:
            typer.secho(
                f"AUDIT FAILED: {line}; DP is broken somewhere in this run",
                fg=typer.colors.RED,
                err=True,
            )
        raise typer.Exit(EXIT_FAILED)
    raise typer.Exit(EXIT_OK)


@app.command()
def sweep(
    sweep_file: Annotated[
        Path, typer.Argument(help="Experiment/sweep TOML ([experiment], [config], [grid]).")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Sweep folder (default runs/<name>).")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Show Flower's and Ray's logs.")] = False,
) -> None:
    """Run every cell of a sweep's grid one after another, then compare them."""
    from fedlora.simulations.sweep import comparison_table, load_sweep, run_sweep

    try:
        spec = load_sweep(sweep_file)
        folder = out or Path("runs") / spec.name
        n = len(spec.cells())
        typer.echo(f"sweep {spec.name}: {n} cell(s) x {spec.num_clients} clients -> {folder}")
        done: list[str] = []

        def progress(row: dict[str, Any]) -> None:
            done.append(row["cell"])
            acc = row["final_accuracy"]
            typer.echo(
                f"[cell {len(done)}/{n}] {row['cell']}: {row['status']} · final acc "
                f"{'-' if acc is None else f'{acc:.4f}'} · {row['wall_seconds']:.0f} s"
            )

        rows = run_sweep(spec, folder, verbose, on_cell=progress)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(comparison_table(rows))
    typer.echo(f"comparison.csv, comparison.png and one folder per cell in {folder}")
    states = {row["status"] for row in rows}
    if states <= {"completed"}:
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(EXIT_FAILED if states - {"completed", "stopped"} else EXIT_STOPPED)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (e.g. runs/latest).")],
) -> None:
    """(Re)write a run's plots and TensorBoard events and print its summary."""
    from fedlora.simulations.report import summary_table, write_reports

    try:
        written = write_reports(run_dir)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    table = summary_table(run_dir)
    if table:
        typer.echo(table)
    for path in written["plots"]:
        typer.echo(f"plot: {path}")
    typer.echo(f"tensorboard: tensorboard --logdir {written['tensorboard']}")


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A task=causal-lm run directory.")],
    prompt: Annotated[str, typer.Argument(help="The instruction to answer.")],
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 128,
) -> None:
    """Answer PROMPT with the base model plus the run's federated adapter, streaming tokens."""
    from fedlora.models.generation import generate_text

    try:
        generate_text(run_dir, prompt, max_new_tokens, stream=True)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (or its adapter/).")],
    input_file: Annotated[
        Path, typer.Option("--input", "-i", help="CSV, JSONL or Parquet file of inputs.")
    ],
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Where to write (default INPUT.predictions.EXT)."),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(help="Input column (default: text for a classifier, prompt for an LM)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Causal LM: longest answer.")] = 64,
) -> None:
    """Write INPUT's rows with the run's predictions (labels and scores, or answers)."""
    from fedlora.models.predict import predict_file

    try:
        out = predict_file(run_dir, input_file, output, column, max_new_tokens)
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(EXIT_BAD_INPUT) from None
    typer.echo(f"predictions: {out}")


def main() -> None:  # pragma: no cover - console entry
    """Entry point that never shows a traceback for a user error."""
    try:
        app()
    except FedloraError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(EXIT_BAD_INPUT)


if __name__ == "__main__":  # pragma: no cover
    main()
