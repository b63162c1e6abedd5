"""Names the LoRA-aware strategies and the ClientApp agree on.

Values that cross the wire live in Flower records under these constant keys,
so the server side (``fedlora/strategies``) and the client side
(``fedlora/client``) cannot drift apart by a typo.
"""

from __future__ import annotations

# How a client trains for a strategy (see registry.client_mode):
MODE_STANDARD = "standard"  # train A, B and head at the run's lora-rank; send all of them
MODE_FFA = "ffa"  # A frozen at the shared seeded init; send B and head only
MODE_HETERO = "hetero-rank"  # train at the node's own rank; send all of them

# Train ConfigRecord (server -> client): the server decodes compressed deltas.
KEY_DECODES_COMPRESSED = "decodes-compressed"

# Query (server -> client) asking a node for its LoRA rank, and the reply.
QUERY_LORA_RANK = "fedlora-lora-rank"
RANK_RECORD = "lora-rank"
KEY_LORA_RANK = "lora-rank"  # also the node-config key a site sets its rank with

# Train metrics the LoRA strategies add.
METRIC_TRUNCATION = "lora-truncation-error"  # relative Frobenius error of the global factors
METRIC_REJECTED = "updates-rejected"  # replies left out because they failed validation
