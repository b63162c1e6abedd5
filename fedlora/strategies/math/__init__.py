"""Aggregation math: pure, typed numpy functions (no Flower, no torch).

* :mod:`~.lora`: adapter states, LoRA factor pairs, weighted and running
  means, norms, the SVD refactorisation of a product;
* :mod:`~.exact`: ``lora-exact``, the mean of the products ``B_i A_i``
  refactorised to rank r (and its truncation error);
* :mod:`~.ffa`: ``ffa-lora``, A frozen at a shared seeded init, B averaged;
* :mod:`~.hetero`: ``hetero-rank``, sites at their own ranks, zero-padded
  and re-split.

Each is tested against numbers worked out by hand; the Flower-facing
strategies in :mod:`fedlora.strategies` call them.
"""
