"""The local-DP plan of a run, made before round 1 (and by ``fedlora plan``).

In a simulation the researcher holds every partition, so the driver knows
each virtual site's example count and plans the federation exactly as the
nodes will train (:mod:`fedlora.privacy.plan`); a plan that cannot learn
stops the run before any privacy is spent (``dp-plan=refuse``, the default)
or is printed as a warning (``dp-plan=warn``). A deployment's sites keep
their sizes to themselves: the operator plans with the sizes the sites
agreed to share (``fedlora plan --site-examples``), and each node applies
the same recipe to its own count when it trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig
from fedlora.privacy.plan import FederationPlan, plan_federation, plan_lines


def noised_coordinates(cfg: RunConfig, num_labels: int) -> int:
    """How many adapter entries a node's DP-SGD noises: every trainable one
    (under FFA-LoRA, LoRA A is frozen and carries none)."""
    from fedlora.models.adapter import set_lora_a_trainable
    from fedlora.models.task import get_task
    from fedlora.protocol import MODE_FFA, client_mode

    task = get_task(cfg.task)
    folder = str(task.folder(cfg.model_path or None))
    model = task.build_model(folder, max(num_labels, 1), cfg.lora, cfg.seed, "cpu")
    set_lora_a_trainable(model, client_mode(cfg.strategy) != MODE_FFA)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def simulation_sites(cfg: RunConfig, num_clients: int) -> tuple[list[int], int]:
    """Each virtual site's training examples and the number of labels."""
    from fedlora.data.partition import partition_summary

    rows = partition_summary(cfg.data, cfg.seed, num_clients)
    return [int(r["examples"]) for r in rows], len(rows[0]["labels"]) if rows else 1


def make_plan(
    cfg: RunConfig, site_examples: Sequence[int], num_labels: int, trainable: int | None = None
) -> FederationPlan:
    """The federation's plan; ``trainable`` is counted on the model when not given."""
    if trainable is None:
        trainable = noised_coordinates(cfg, num_labels)
    cap = cfg.privacy.sim_epsilon_cap if cfg.privacy.sim_epsilon_cap > 0 else math.inf
    return plan_federation(cfg, site_examples, trainable, cap)


def preflight(cfg: RunConfig, num_clients: int, concurrent: int, run_dir: Path) -> str | None:
    """What a simulation checks before Ray starts: the local-DP plan (printed,
    written to ``plan.json``) and whether ``concurrent`` clients fit in memory.
    Returns the reason to stop, else None."""
    from fedlora.models.task import get_task
    from fedlora.simulations.memory import check_memory, model_shape

    trainable = 0
    if cfg.privacy.dp_mode == "local":
        sites, labels = simulation_sites(cfg, num_clients)
        trainable = noised_coordinates(cfg, labels)
        refusal = check_plan(cfg, make_plan(cfg, sites, labels, trainable), run_dir)
        if refusal:
            return refusal
    shape = model_shape(get_task(cfg.task).folder(cfg.model_path or None))
    return check_memory(cfg, concurrent, shape, trainable)


def check_plan(cfg: RunConfig, plan: FederationPlan, run_dir: Path) -> str | None:
    """Write and print the plan; the reason to stop when it cannot learn and
    ``dp-plan=refuse``, else None."""
    from fedlora.io import atomic_write_json
    from fedlora.rundir import PLAN_JSON

    atomic_write_json(run_dir / PLAN_JSON, plan_record(plan))
    print(
        "\n".join(["local-DP plan (before round 1; `fedlora plan` prints it):", *plan_lines(plan)])
    )
    if plan.can_learn or cfg.privacy.dp_plan == "warn":
        return None
    return (
        f"the local-DP plan says this run cannot learn: noise-to-signal {plan.nsr:.2f} "
        f"(learns below {plan.marginal:g}); {'; '.join(plan.advice)}. No privacy was spent. See "
        f"{run_dir / PLAN_JSON}; dp-plan=warn runs it anyway"
    )


def plan_record(plan: FederationPlan) -> dict[str, Any]:
    """``plan.json``: the plan with its verdict, for people and for tools."""
    return {"version": 1, **plan.to_json(), "can_learn": plan.can_learn}
