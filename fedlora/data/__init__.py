"""Local data: reading a site's file, the federation's label list, demo corpora
and the simulation's partitions."""

from fedlora.data.labels import LabelSpace
from fedlora.data.sources import (
    DEMO_DATASETS,
    TextDataset,
    load_demo,
    load_table,
)

__all__ = ["DEMO_DATASETS", "LabelSpace", "TextDataset", "load_demo", "load_table"]
