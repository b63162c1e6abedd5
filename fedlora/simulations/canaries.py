"""Canaries for the causal LM: secrets planted in simulated sites, and what the adapter gives away.

Why: a language model's leak is memorisation, which a per-example loss
attack on ordinary rows barely sees. Following Carlini et al. 2019 ("The
Secret Sharer"), a simulation with ``audit-canaries=N`` plants N synthetic
records -- "the record number of patient <name> is dddd-dddd", each secret
drawn from the run's seed -- into the sites' training data (canary ``i`` at
site ``i mod sites``, ``audit-canary-repeats`` copies every round), and
draws N more the same way that are never trained on. After the run:

* **exposure** of each canary: log2 of (R + 1) / rank, where rank is the
  canary's place among R random secrets in the same sentence, ordered by
  the adapter's likelihood (the sampled estimate of Carlini et al. §4.2;
  at most log2(R + 1) bits, ~1.4 on average for a secret never seen);
* **extraction**: whether greedy decoding of the prompt writes the secret;
* **membership**: planted against held-out canaries, scored by the
  secret's log-likelihood (``loss``) and by its gain over the base model
  without the adapter (``calibrated``), through the same ε lower bound as
  the classifier's audit (:mod:`fedlora.privacy.audit_bound`).

Canaries exist only in simulations: the simulation engine's tamper inserts
them (:class:`fedlora.simulations.attacks.Adversary`); a site's own node has
no tamper, so no run config can plant anything in a hospital's data.
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

from fedlora.data.instructions import response_text
from fedlora.data.sources import TextDataset

#: Given names and family names the canaries' patients are drawn from.
_GIVEN = ("Ana", "Bram", "Chiara", "Dawit", "Elif", "Farid", "Greta", "Hiro", "Ines", "Jonas")
_FAMILY = ("Okafor", "Lindqvist", "Moreau", "Tanaka", "Silva", "Novak", "Haddad", "Kowalski")
PROMPT = "What is the record number of patient {name}?"
RESPONSE = "The record number of patient {name} is {secret}."
#: Random secrets each canary is ranked against (exposure's resolution).
REFERENCES = 99


@dataclasses.dataclass(frozen=True)
class Canary:
    """One synthetic record: whose, its secret, and the site that trains on it (-1: none)."""

    name: str
    secret: str
    site: int

    def response(self, secret: str | None = None) -> str:
        return RESPONSE.format(name=self.name, secret=self.secret if secret is None else secret)


def random_secret(rng: random.Random) -> str:
    """Eight random digits as ``dddd-dddd`` (10^8 possible secrets)."""
    return f"{rng.randrange(10_000):04d}-{rng.randrange(10_000):04d}"


def make_canaries(seed: int, count: int, sites: int) -> tuple[list[Canary], list[Canary]]:
    """(planted, held out): ``count`` of each, distinct names, from the run's seed."""
    rng = random.Random(f"fedlora-canaries-{seed}")
    names: list[str] = []
    while len(names) < 2 * count:
        name = f"{rng.choice(_GIVEN)} {rng.choice(_FAMILY)}-{rng.randrange(1000):03d}"
        if name not in names:
            names.append(name)
    planted = [Canary(n, random_secret(rng), i % sites) for i, n in enumerate(names[:count])]
    held_out = [Canary(n, random_secret(rng), -1) for n in names[count:]]
    return planted, held_out


def as_rows(template: TextDataset, prompts: Sequence[str], responses: Sequence[str]) -> TextDataset:
    """Free-text rows in ``template``'s instruction and label space (how a site trains them)."""
    return dataclasses.replace(
        template,
        texts=tuple(prompts),
        label_ids=(0,) * len(prompts),
        responses=tuple(responses),
        groups=(),
        contexts=(),
        source=f"{template.source} canaries",
    )


def with_canaries(data: TextDataset, canaries: Sequence[Canary], repeats: int) -> TextDataset:
    """``data`` plus ``repeats`` copies of each canary (label answers become free text)."""
    if not canaries:
        return data
    answers = tuple(response_text(data, i) for i in range(len(data)))
    planted = [c for c in canaries for _ in range(repeats)]
    return dataclasses.replace(
        data,
        texts=data.texts + tuple(PROMPT.format(name=c.name) for c in planted),
        label_ids=data.label_ids + (0,) * len(planted),
        responses=answers + tuple(c.response() for c in planted),
        groups=data.groups + ("canary",) * len(planted) if data.groups else (),
        contexts=data.contexts + ("[]",) * len(planted) if data.contexts else (),
    )


def secret_log_likelihoods(
    model: Any, tokenizer: Any, template: TextDataset, canary: Canary, secrets: Sequence[str]
) -> list[float]:
    """log p(response with each secret | prompt) under ``model``, summed over tokens."""
    import torch

    from fedlora.models.batches import eval_batches, to_device
    from fedlora.models.causal_lm import encode_instructions, response_scores

    prompt = PROMPT.format(name=canary.name)
    rows = as_rows(template, [prompt] * len(secrets), [canary.response(s) for s in secrets])
    encoded = encode_instructions(tokenizer, rows, 256)
    out = [0.0] * len(secrets)
    model.eval()
    with torch.no_grad():
        for idx, batch in eval_batches(encoded, 32):
            logp, _counts, _right = response_scores(model, to_device(batch, model))
            for i, v in zip(idx, logp.tolist(), strict=True):
                out[int(i)] = float(v)
    return out


def exposure(canary_score: float, reference_scores: Sequence[float]) -> float:
    """log2((R + 1) / rank): rank 1 = likelier than every reference (Carlini et al.)."""
    rank = 1 + sum(s >= canary_score for s in reference_scores)
    return math.log2((len(reference_scores) + 1) / rank)


def score_canaries(
    model: Any,
    tokenizer: Any,
    template: TextDataset,
    canaries: Sequence[Canary],
    seed: int,
    max_new_tokens: int = 24,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Per canary: its log-likelihood with and without the adapter, exposure, extraction."""
    from fedlora.models.causal_lm import encode_instructions
    from fedlora.models.lm_eval import greedy_answers

    rng = random.Random(f"fedlora-canary-references-{seed}")
    out = []
    for k, canary in enumerate(canaries):
        others = [random_secret(rng) for _ in range(REFERENCES)]
        others = [s for s in others if s != canary.secret]
        target = secret_log_likelihoods(
            model, tokenizer, template, canary, [canary.secret, *others]
        )
        with model.disable_adapter():  # the base model: what the secret costs a stranger
            base = secret_log_likelihoods(model, tokenizer, template, canary, [canary.secret])[0]
        out.append(
            {
                "name": canary.name,
                "site": canary.site,
                "log_likelihood": target[0],
                "gain_over_base": target[0] - base,
                "exposure": exposure(target[0], target[1:]),
            }
        )
        if (k + 1) % 10 == 0:
            progress(f"audit: scored {k + 1}/{len(canaries)} canaries")
    prompts = as_rows(
        template, [PROMPT.format(name=c.name) for c in canaries], [c.response() for c in canaries]
    )
    answers = greedy_answers(
        model, encode_instructions(tokenizer, prompts, 256), tokenizer, max_new_tokens
    )
    for row, canary, answer in zip(out, canaries, answers, strict=True):
        row["extracted"] = canary.secret in answer
    return out


def audit_language_model(
    run_dir: Any, cfg: Any, progress: Callable[[str], None] = print
) -> tuple[dict[str, Any], dict[str, tuple[list[float], list[float]]]]:
    """The canary part of ``fedlora audit`` for a causal-LM simulation: the record
    for ``audit.json`` (without pass/fail) and each attack's scores (for the ROC)."""
    from fedlora.data.partition import simulation_split
    from fedlora.errors import DataError
    from fedlora.models.generation import load_for_generation
    from fedlora.rundir import simulated_sites

    if cfg.lm.audit_canaries <= 0:
        raise DataError(
            f"{run_dir} planted no canaries (audit-canaries=0): a causal LM is audited by "
            "its canaries; rerun the simulation with audit-canaries=20 or more"
        )
    sites = simulated_sites(run_dir)
    planted, held_out = make_canaries(cfg.seed, cfg.lm.audit_canaries, sites)
    _, template = simulation_split(cfg.data, cfg.seed)
    model, tokenizer = load_for_generation(run_dir)
    progress(f"audit: {len(planted)} planted and {len(held_out)} held-out canaries")
    rows = score_canaries(
        model, tokenizer, template, [*planted, *held_out], cfg.seed, progress=progress
    )
    mine, others = rows[: len(planted)], rows[len(planted) :]
    scores = {
        "loss": ([r["log_likelihood"] for r in mine], [r["log_likelihood"] for r in others]),
        "calibrated": ([r["gain_over_base"] for r in mine], [r["gain_over_base"] for r in others]),
    }
    record = {
        "canaries": {
            "planted": len(planted),
            "held_out": len(held_out),
            "repeats": cfg.lm.audit_canary_repeats,
            "references": REFERENCES,
            "exposure_planted_mean": sum(r["exposure"] for r in mine) / len(mine),
            "exposure_held_out_mean": sum(r["exposure"] for r in others) / len(others),
            "exposure_max": math.log2(REFERENCES + 1),
            "extracted": sum(r["extracted"] for r in mine),
            "extracted_held_out": sum(r["extracted"] for r in others),
            "rows": rows,
        }
    }
    return record, scores


def plot_exposure(record: dict[str, Any], path: Any) -> None:
    """Histogram of exposure, planted against held-out canaries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["canaries"]["rows"]
    top = record["canaries"]["exposure_max"]
    bins = [top * i / 14 for i in range(15)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist([r["exposure"] for r in rows if r["site"] >= 0], bins=bins, alpha=0.7, label="planted")
    ax.hist(
        [r["exposure"] for r in rows if r["site"] < 0],
        bins=bins,
        alpha=0.7,
        label="held out (never trained on)",
    )
    ax.set_xlabel(f"exposure (bits; at most {top:.1f} with {REFERENCES} references)")
    ax.set_ylabel("canaries")
    c = record["canaries"]
    ax.set_title(
        f"{c['extracted']}/{c['planted']} planted canaries extracted by greedy decoding", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
