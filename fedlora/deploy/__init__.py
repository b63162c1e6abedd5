"""Deployment: real SuperLink and SuperNode processes with TLS and node authentication.

============================  ===================================================
module                        what it holds
============================  ===================================================
:mod:`~.certs`                the CA, the server certificate, nodes' login keys
:mod:`~.preflight`            checks before a process starts (keys, data file,
                              columns, ledger folder), with the fix named
:mod:`~.flower`               the Flower commands fedlora starts
                              (``flower-superlink``, ``flower-supernode`` behind
                              fedlora's pinned ClientApp launcher) and their config
:mod:`~.flwr_cli`             the operator's ``flwr`` calls: register, run, watch
:mod:`~.processes`            local processes on loopback (tests, one-machine trials)
============================  ===================================================

The ``fedlora certs | server | register | node | run`` commands
(:mod:`fedlora.cli.ops`) are thin wrappers over these.
"""
