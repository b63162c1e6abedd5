"""``lora-exact``: the global LoRA delta is the mean of the clients' deltas.

FedEx-LoRA (Singhal et al., 2024, https://arxiv.org/abs/2410.09432); FLoRA
stacking (Wang et al., 2024, https://arxiv.org/abs/2409.05976).

FedAvg averages A and B separately, and ``mean(B_i) @ mean(A_i)`` is not
``mean(B_i @ A_i)``. This strategy averages the products
(:func:`fedlora.strategies.math.exact.aggregate_exact`) and sends clients the
best factors of that mean at the federation's rank (truncated SVD, singular
values split evenly between B and A); dense tensors (the classifier head) are
averaged as FedAvg would. When the mean delta has a higher rank than the
adapter can hold, the SVD drops the smallest directions: the train metric
``lora-truncation-error`` reports ``||M - B_g A_g||_F / ||M||_F`` each round
(0 = exact). Clients train as in plain LoRA (``client_mode`` standard).
"""

from __future__ import annotations

from fedlora.protocol import METRIC_TRUNCATION, MODE_STANDARD
from fedlora.records import State
from fedlora.strategies.base import LoraStrategy, revive_dead_directions, state_rank
from fedlora.strategies.math.exact import aggregate_exact

__all__ = ["LoraExact"]


class LoraExact(LoraStrategy):
    """Average LoRA products, re-factorise to the global rank (truncated SVD)."""

    client_mode = MODE_STANDARD

    def aggregate_states(
        self, server_round: int, states: list[State], weights: list[float]
    ) -> tuple[State, dict[str, float]]:
        """Mean of ``B_i A_i`` per module, factorised; dense keys averaged."""
        # Replies were checked against the global arrays, so they share its rank.
        rank = state_rank(states[0])
        result = aggregate_exact(states, weights, rank)
        state = revive_dead_directions(result.state, self.round_seed(server_round))
        return state, {METRIC_TRUNCATION: result.relative_truncation_error}
