"""Local files, the federation's label list, demo corpora, partitions."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest

from fedlora.data.labels import LabelSpace
from fedlora.data.partition import check_partitioner, client_partition, stratified_split
from fedlora.data.sources import load_bbc_news, load_rotten_tomatoes, load_table
from fedlora.errors import ConfigError, DataError
from fedlora.task_settings import DataSettings

SPACE = LabelSpace.of(["cardiology", "neurology", "oncology"])


def test_csv_jsonl_parquet_give_the_same_rows(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(
        {
            "note": ["chest pain", "seizure", "tumour"],
            "dept": ["cardiology", "neurology", "oncology"],
        }
    )
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "a.parquet")
    loaded = [
        load_table(tmp_path / f"a.{ext}", "note", "dept", SPACE)
        for ext in ("csv", "jsonl", "parquet")
    ]
    assert all(d.texts == ("chest pain", "seizure", "tumour") for d in loaded)
    assert all(d.label_ids == (0, 1, 2) for d in loaded)


def test_label_ids_come_from_the_federation_list_not_the_site(tmp_path: Path) -> None:
    # Site A has only oncology and cardiology; site B only neurology.
    (tmp_path / "a.csv").write_text("text,label\nx,oncology\ny,cardiology\n")
    (tmp_path / "b.csv").write_text("text,label\nz,neurology\n")
    a = load_table(tmp_path / "a.csv", "text", "label", SPACE)
    b = load_table(tmp_path / "b.csv", "text", "label", SPACE)
    assert a.label_ids == (2, 0)
    assert b.label_ids == (1,)
    assert a.labels == b.labels == SPACE


def test_missing_file_names_path_and_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data file '.*/nope.csv' does not exist.*data-path"):
        load_table(tmp_path / "nope.csv", "text", "label", SPACE)


def test_missing_column_lists_columns_and_key(tmp_path: Path) -> None:
    (tmp_path / "notes.csv").write_text("text,y\nhello,cardiology\n")
    with pytest.raises(
        DataError, match=r"no column 'label'; columns are: text, y\. Set label-column"
    ):
        load_table(tmp_path / "notes.csv", "text", "label", SPACE)


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="is empty"):
        load_table(tmp_path / "empty.csv", "text", "label", SPACE)
    (tmp_path / "header.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        load_table(tmp_path / "header.csv", "text", "label", SPACE)


def test_unknown_label_names_row_value_and_list(tmp_path: Path) -> None:
    (tmp_path / "n.csv").write_text("text,label\na,cardiology\nb,dermatology\n")
    with pytest.raises(DataError, match=r"row 1 has label 'dermatology'.*cardiology, neurology"):
        load_table(tmp_path / "n.csv", "text", "label", SPACE)


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "n.xlsx").write_text("x")
    with pytest.raises(DataError, match="extension '.xlsx'"):
        load_table(tmp_path / "n.xlsx", "text", "label", SPACE)


def test_bbc_news_demo_has_sorted_labels_and_no_duplicates() -> None:
    bbc = load_bbc_news()
    assert bbc.labels.names == ("business", "entertainment", "politics", "sports", "tech")
    assert len(bbc) == 2225 - 98
    assert len(set(bbc.texts)) == len(bbc)
    counts = collections.Counter(bbc.label_ids)
    assert counts[3] == 505  # sports: 511 files, 6 duplicates


def test_rotten_tomatoes_demo_has_reviews_only() -> None:
    rt = load_rotten_tomatoes()
    assert rt.labels.names == ("fresh", "rotten")
    assert len(rt) == 12808
    assert len(rt.groups) == len(rt)


def test_stratified_split_is_seeded_and_covers_every_label(text_csv: Path) -> None:
    data = load_table(text_csv, "text", "label", None)
    train1, test1 = stratified_split(data, 0.25, seed=3)
    train2, test2 = stratified_split(data, 0.25, seed=3)
    _, test3 = stratified_split(data, 0.25, seed=4)
    assert test1.texts == test2.texts and train1.texts == train2.texts
    assert test1.texts != test3.texts
    assert set(test1.label_ids) == {0, 1, 2}
    assert len(train1) + len(test1) == len(data)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_are_deterministic_and_disjoint(text_csv: Path, partitioner: str) -> None:
    settings = DataSettings(
        dataset="file", data_file=str(text_csv), partitioner=partitioner, dirichlet_alpha=0.3
    )
    parts = [client_partition(settings, 11, i, 4) for i in range(4)]
    again = [client_partition(settings, 11, i, 4) for i in range(4)]
    assert [p.texts for p in parts] == [p.texts for p in again]
    sizes = [len(p) for p in parts]
    assert sum(sizes) == 96  # 120 rows minus the 20% server test split
    other = [client_partition(settings, 12, i, 4).texts for i in range(4)]
    assert other != [p.texts for p in parts]


def test_column_partitioner_follows_the_site_column(tmp_path: Path) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_text_csv

    csv = make_text_csv(tmp_path / "sites.csv", n=90, sites=3)
    settings = DataSettings(
        dataset="file", data_file=str(csv), partitioner="column", partition_column="site"
    )
    parts = [client_partition(settings, 0, i, 3) for i in range(3)]
    assert all(len(set(p.groups)) == 1 for p in parts)
    assert {p.groups[0] for p in parts} == {"site-0", "site-1", "site-2"}
    with pytest.raises(ConfigError, match="set num-supernodes<=3"):
        client_partition(settings, 0, 0, 4)
    # Fewer sites than values: each value goes whole to one site.
    two = [client_partition(settings, 0, i, 2) for i in range(2)]
    assert sorted(len(set(p.groups)) for p in two) == [1, 2]
    assert not set(two[0].groups) & set(two[1].groups)


def test_grouped_indices_by_hand() -> None:
    from fedlora.data.partition import _grouped_indices

    # sizes: a=3, b=2, c=2, d=1 -> a to 0, b to 1, c to 1 (0 has 3 > 2), d to 0 (3 < 4)
    groups = ("a", "b", "a", "c", "b", "a", "c", "d")
    assert _grouped_indices(groups, 2) == ((0, 2, 5, 7), (1, 3, 4, 6))


def test_unknown_partitioner_lists_known() -> None:
    with pytest.raises(
        ConfigError, match="'partitioner' has value 'random'; allowed: iid, dirichlet"
    ):
        check_partitioner("random")


def test_label_space_rejects_duplicates() -> None:
    with pytest.raises(DataError, match="duplicates"):
        LabelSpace.of(["a", "a"])
    assert json.dumps(list(SPACE.names))


def test_iid_sites_hold_every_label_near_the_pool_share() -> None:
    """The pool comes label by label from the stratified split; an IID site is a
    shuffled share of it (before the fix, contiguous shards gave BBC News site 0
    171 business articles and nothing else). 10 sites of ~170 over 5 labels:
    a site's share of a label has sd ~0.03; 0.15 is five of them."""
    from fedlora.config import RunConfig
    from fedlora.data.partition import partition_summary

    cfg = RunConfig.from_flat({"dataset": "bbc-news", "partitioner": "iid"})
    rows = partition_summary(cfg.data, 42, 10)
    totals: dict[str, int] = {}
    for row in rows:
        for name, count in row["labels"].items():
            totals[name] = totals.get(name, 0) + count
    pool = sum(totals.values())
    for row in rows:
        for name, count in row["labels"].items():
            assert abs(count / row["examples"] - totals[name] / pool) < 0.15, (row, name)
