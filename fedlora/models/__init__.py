"""The model side of fedlora, in the spirit of PEFT's tuner layout.

============================  ===================================================
module                        what it holds
============================  ===================================================
:mod:`~.loading`              base model paths, tokenizer, building the frozen
                              base + LoRA adapter (device first, PEFT second),
                              the per-process cache
:mod:`~.pooling`              the sentence vector the head reads (masked mean),
                              the feature centre it is shifted by
:mod:`~.centering`            the centre's clip and the federation's mean
:mod:`~.adapter`              the adapter's tensors: what travels, strict
                              loading, PEFT export and reload
:mod:`~.batches`              examples as token ids, padded per batch
:mod:`~.inference`            evaluation and class probabilities
:mod:`~.task`                 the task seam: what a task needs (build, encode,
                              loss, evaluate, export); sequence classification
                              is the one task today
============================  ===================================================

The node (:mod:`fedlora.client`) trains with these; the server
(:mod:`fedlora.server`) evaluates and exports with them. Neither side's code
lives here, so the two never import each other.
"""
