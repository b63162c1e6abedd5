"""Local data: reading a site's file, the federation's label list, demo corpora
and the simulation's partitions."""

from fedlora.data.catalog import DEMO_DATASETS, load_demo
from fedlora.data.labels import LabelSpace
from fedlora.data.sources import TextDataset, load_table

__all__ = ["DEMO_DATASETS", "LabelSpace", "TextDataset", "load_demo", "load_table"]
