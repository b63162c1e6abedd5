"""The ``fedlora`` command line.

* :mod:`~.main`: ``simulate``, ``sweep``, ``report`` (researchers);
* :mod:`~.ops`: ``certs``, ``server``, ``register``, ``node``, ``run``,
  ``app-digest``, ``signing-key`` (operators and sites' IT);
* :mod:`~.common`: exit codes and ``-c key=value`` parsing, shared by both.
"""

from fedlora.cli.main import app, main

__all__ = ["app", "main"]
