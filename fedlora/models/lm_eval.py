"""How the server scores a causal LM on its held-out split, each round.

* ``loss`` / ``perplexity``: response tokens only (perplexity per token over the split).
* ``choice``: log-likelihood multiple choice over the label list, the way
  lm-evaluation-harness scores multiple choice (``acc``: the option whose
  summed log-probability after the prompt is highest).
* ``exact-match``: the greedy answer, stripped of surrounding space and a
  final full stop, equals the gold label (case-insensitive).
* ``rouge-l``: ROUGE-L F1 (Google's ``rouge-score``) of the greedy answer
  against the reference, for free-text answers (summaries).

``accuracy`` in the history is ``choice`` for label answers, else the share of
responses whose every token is the argmax under teacher forcing.
"""

from __future__ import annotations

from typing import Any

import torch

from fedlora.errors import ConfigError
from fedlora.models.batches import EncodedDataset, collate, eval_batches, to_device
from fedlora.models.causal_lm import response_scores
from fedlora.protocol import METRIC_ACCURACY, METRIC_LOSS
from fedlora.task_settings import LABEL_METRICS, LmSettings


def chosen_metrics(settings: LmSettings, label_style: bool) -> tuple[str, ...]:
    """The metrics to compute; a label-style metric without a label list is an error."""
    if settings.lm_metrics == ("auto",):
        return ("perplexity", "exact-match", "choice") if label_style else ("perplexity", "rouge-l")
    asked = [m for m in settings.lm_metrics if m in LABEL_METRICS]
    if asked and not label_style:
        raise ConfigError(
            f"lm-metrics={','.join(settings.lm_metrics)} asks for {', '.join(asked)}, which "
            "score answers against a label list, but this data has free-text answers. Set "
            "labels='a,b,...' (every response one of them) or drop " + ", ".join(asked)
        )
    return settings.lm_metrics


@torch.no_grad()
def lm_metrics(
    model: Any, data: EncodedDataset, tokenizer: Any, settings: LmSettings, labels: list[str]
) -> dict[str, float]:
    """Every chosen metric of ``model`` on ``data`` (capped at eval-max-examples)."""
    model.eval()
    if settings.eval_max_examples and len(data) > settings.eval_max_examples:
        data = _head(data, settings.eval_max_examples)
    label_style = bool(data.choices)
    wanted = chosen_metrics(settings, label_style)
    nll, tokens, right, n = 0.0, 0, 0, 0
    loss_sum = 0.0
    for _idx, batch in eval_batches(data, 16):
        logp, counts, ok = response_scores(model, to_device(batch, model))
        nll -= float(logp.sum())
        loss_sum += float((-logp / counts.clamp(min=1)).sum())
        tokens += int(counts.sum())
        right += int(ok.sum())
        n += int(counts.numel())
    out = {METRIC_LOSS: loss_sum / max(n, 1), METRIC_ACCURACY: right / max(n, 1)}
    if "perplexity" in wanted:
        out["perplexity"] = float(torch.exp(torch.tensor(nll / max(tokens, 1))))
    if "choice" in wanted:
        out["choice"] = _choice_accuracy(model, data)
        out[METRIC_ACCURACY] = out["choice"]
    if "exact-match" in wanted or "rouge-l" in wanted:
        longest = max((len(c) for c in data.choices), default=settings.max_new_tokens)
        budget = (
            min(settings.max_new_tokens, longest + 2) if label_style else settings.max_new_tokens
        )
        answers = greedy_answers(model, data, tokenizer, budget)
        golds = [tokenizer.decode(r[p:], skip_special_tokens=True) for r, p in _pairs(data)]
        if "exact-match" in wanted:
            hits = [_norm(a) == _norm(g) for a, g in zip(answers, golds, strict=True)]
            out["exact-match"] = sum(hits) / max(len(hits), 1)
        if "rouge-l" in wanted:
            from rouge_score import rouge_scorer

            scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
            scores = [
                scorer.score(g, a)["rougeL"].fmeasure for a, g in zip(answers, golds, strict=True)
            ]
            out["rouge-l"] = sum(scores) / max(len(scores), 1)
    return out


def _pairs(data: EncodedDataset) -> list[tuple[list[int], int]]:
    return list(zip(data.input_ids, data.prompt_lengths, strict=True))


def _norm(text: str) -> str:
    return text.strip().rstrip(".").strip().lower()


def _head(data: EncodedDataset, k: int) -> EncodedDataset:
    out = EncodedDataset(
        data.input_ids[:k],
        data.labels[:k],
        data.pad_id,
        targets=data.targets[:k] if data.targets is not None else None,
    )
    out.prompt_lengths = data.prompt_lengths[:k]
    out.choices = data.choices
    return out


def _choice_accuracy(model: Any, data: EncodedDataset) -> float:
    """Share of examples whose gold label's option has the highest summed log-probability."""
    scores = torch.zeros((len(data), len(data.choices)))
    for k, option in enumerate(data.choices):
        rows = []
        for ids, p in _pairs(data):
            row = ids[:p] + option
            rows.append(
                {
                    "input_ids": torch.tensor(row),
                    "labels": torch.tensor(0),
                    "targets": torch.tensor([-100] * p + option),
                }
            )
        for start in range(0, len(rows), 16):
            batch = to_device(collate(rows[start : start + 16], data.pad_id), model)
            logp, _counts, _ok = response_scores(model, batch)
            scores[start : start + len(logp), k] = logp.cpu()
    gold = torch.tensor(data.labels)
    return float((scores.argmax(-1) == gold).float().mean())


def greedy_answers(
    model: Any, data: EncodedDataset, tokenizer: Any, max_new_tokens: int
) -> list[str]:
    """The greedy continuation of every prompt (left-padded batches, stops at EOS)."""
    answers: list[str] = []
    pairs = _pairs(data)
    for start in range(0, len(pairs), 16):
        chunk = [ids[:p] for ids, p in pairs[start : start + 16]]
        width = max(len(c) for c in chunk)
        ids = torch.full((len(chunk), width), data.pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, c in enumerate(chunk):
            ids[row, width - len(c) :] = torch.tensor(c)
            mask[row, width - len(c) :] = 1
        batch = to_device({"input_ids": ids, "attention_mask": mask}, model)
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=data.pad_id,
        )
        answers.extend(tokenizer.decode(o[width:], skip_special_tokens=True) for o in out)
    return answers
