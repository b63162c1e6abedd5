"""fedlora: private federated LoRA fine-tuning of transformers.

Folders tell the architecture: ``client`` (what a site runs), ``server`` (what
the operator runs), ``strategies`` (aggregation), ``privacy`` (DP-SGD and
accounting), ``simulations`` (many virtual clients on one machine), with
small shared modules for config, models, data and I/O.
"""

__version__ = "0.1.0"
