"""``ffa-lora``: A frozen at the shared init, only B (and the head) trained and sent.

FFA-LoRA (Sun et al., ICLR 2024, https://arxiv.org/abs/2403.12313).

With A identical and frozen everywhere, the mean of the clients' deltas is
``mean(B_i) @ A``, so averaging B is exact
(:func:`fedlora.strategies.ffa_lora.aggregate_ffa`), half the LoRA tensors
never travel, and DP noise is spread over half the dimensions.

Where the shared A comes from: every party builds the model with
:func:`fedlora.models.loading.build_model`, which draws PEFT's LoRA init from a
generator forked from the run ``seed``, so the A each client holds is
bit-identical to the server's. Clients (``client_mode`` ffa) set
``requires_grad=False`` on every ``lora_A`` and send only B and the head; the
server keeps A from the global arrays it sent. A client that sends an A which
differs from the global one (it trained A) is left out.

``server-learning-rate`` (strategy-options) scales the round's mean step
before it is applied: ``B ← B + η_s · (mean(B_i) − B)``, the same for the
head. With A shared this is still exactly a step of ``η_s · mean ΔW``. The
idea under local DP: each client's rate is capped by its *own* noise,
while the server scales the *average*, whose noise is about √K smaller for
K clients. Measured on Rotten Tomatoes at ε = 8, η_s = 2 overshot (0.667 vs
0.743 at η_s = 1; docs/RESULTS.md): the DP recipe's local rate already sits
near the edge of stability. The default 1 is plain FFA-LoRA.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from fedlora.errors import ConfigError, UpdateRejected
from fedlora.protocol import MODE_FFA
from fedlora.records import State, is_lora_a
from fedlora.strategies.base import LoraStrategy
from fedlora.strategies.math.ffa import aggregate_ffa, ffa_trainable_keys

__all__ = ["FfaLora"]


class FfaLora(LoraStrategy):
    """Average B and dense tensors; keep the global A unchanged."""

    client_mode = MODE_FFA

    def __init__(
        self, *, seed: int = 0, server_learning_rate: float = 1.0, **fedavg_kwargs: Any
    ) -> None:
        if not (server_learning_rate > 0 and np.isfinite(server_learning_rate)):
            raise ConfigError(
                f"strategy-options server-learning-rate={server_learning_rate!r} must be a "
                "finite number > 0 (1.0 applies the clients' mean step as it is)"
            )
        super().__init__(seed=seed, **fedavg_kwargs)
        self.server_learning_rate = float(server_learning_rate)

    def check_update(self, state: State, base: ArrayRecord, source: str) -> None:
        """B and head must all be there; an A, if sent, must be the global one."""
        missing = [k for k in ffa_trainable_keys(base.keys()) if k not in state]
        if missing:
            raise UpdateRejected(
                f"{source} did not send {len(missing)} tensor(s), e.g. {missing[0]!r}; "
                "under ffa-lora every lora_B and head tensor must be sent"
            )
        for key, value in state.items():
            if is_lora_a(key) and not np.array_equal(value, base[key].numpy()):
                raise UpdateRejected(
                    f"{source} sent {key!r} that differs from the global A; under ffa-lora "
                    "A is frozen (the client must not train it)"
                )

    def aggregate_states(
        self, server_round: int, states: list[State], weights: list[float]
    ) -> tuple[State, dict[str, float]]:
        """Weighted mean of B and dense tensors (a step scaled by the server's rate);
        A from the global arrays."""
        trained = [{k: v for k, v in s.items() if not is_lora_a(k)} for s in states]
        mean = aggregate_ffa(trained, weights)
        base = self.global_state()
        if self.server_learning_rate != 1.0:
            rate = np.float32(self.server_learning_rate)
            mean = {k: (base[k] + rate * (v - base[k])).astype(np.float32) for k, v in mean.items()}
        shared_a = {k: v for k, v in base.items() if is_lora_a(k)}
        return {**shared_a, **mean}, {}
