"""Feature centering, node side: the one-time sentence-vector statistics.

With ``feature-centering`` the head reads ``x - c``, where ``c`` is the
federation's mean sentence vector (see :class:`fedlora.models.MaskedMeanPooler`).
Before round 1 the server asks every node for the *sum* of its examples'
vectors and their count; it divides the totals and ships ``c`` with every
round's messages.

Under local DP this sum is a release of the node's data like any other, so
it goes through the same steps as a DP-SGD round:

1. the node's ledger is checked against its own cap *before* any data is read
   (done by the caller, as for training);
2. each vector is clipped to ``feature-center-clip * sqrt(pooling-layers)``
   (``R``) and each example also adds the constant ``R`` to the count slot, so
   one example moves the released vector by at most ``sqrt(2) R``;
3. the release is recorded in the ledger as one full-batch Gaussian step at
   noise multiplier ``dp-center-noise`` *before* the noisy sum is built (a
   crash afterwards over-counts, never under);
4. Gaussian noise of std ``dp-center-noise * sqrt(2) R`` is added to every
   coordinate from the same CSPRNG-seeded generators DP-SGD uses.

Without DP the node sends its exact sum and count (as it sends exact
updates); central DP and SecAgg+ refuse the option at configuration time.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.config import RunConfig
from fedlora.models.batches import EncodedDataset, eval_batches, to_device
from fedlora.models.centering import clip_rows, sum_clip
from fedlora.models.pooling import pooled_features
from fedlora.privacy.dpsgd import round_generators
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.releases import FEATURE_CENTRE_ROUND, center_release


def feature_statistics(
    model: torch.nn.Module,
    dataset: EncodedDataset,
    cfg: RunConfig,
    ledger: PrivacyLedger | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, float]:
    """(sum of sentence vectors, example count) to send for feature centering.

    ``ledger`` given (local DP): the clipped, noised release described in the
    module docstring, recorded before it is built. ``generator``: a seeded
    generator for reproducible noise (tests only; warns), else the CSPRNG.
    """
    features = pooled_features(
        model, (to_device(batch, model) for _idx, batch in eval_batches(dataset, 64))
    ).double()
    if ledger is None:
        return features.sum(0).numpy(), float(len(features))
    clip = sum_clip(cfg)
    sigma = cfg.privacy.dp_center_noise
    ledger.record_releases(FEATURE_CENTRE_ROUND, center_release(cfg))
    noise_rng, _ = round_generators(torch.device("cpu"), generator is None, generator)
    released = torch.cat(
        [clip_rows(features, clip).sum(0), torch.tensor([clip * len(features)]).double()]
    )
    std = sigma * math.sqrt(2.0) * clip
    released = released + std * torch.randn(released.shape, generator=noise_rng, dtype=torch.double)
    return released[:-1].numpy(), float(released[-1]) / clip
