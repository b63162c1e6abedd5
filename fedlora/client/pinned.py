"""The ClientApp process a fedlora node runs: Flower's, behind the site's app pin.

``fedlora node`` puts a ``flwr-clientapp`` first on the SuperNode's PATH
that runs this module; Flower's SuperExec starts it by that name for every
task. It is Flower's own ``flwr-clientapp`` with one step added: the task's
FAB is checked against the site's trust file (:mod:`fedlora.app_trust`)
when Flower is about to install it, before any of it is installed or
imported. A refusal raises inside Flower's task handling, so the server
receives an error reply whose reason names the app's digest.

The trust file comes from the environment the site's own launcher set
(``FEDLORA_TRUSTED_APPS``), never from the run. Without it the process
refuses every app, unless the site chose ``FEDLORA_TRUST_ANY_APP=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

ENV_TRUSTED_APPS = "FEDLORA_TRUSTED_APPS"
ENV_TRUST_ANY = "FEDLORA_TRUST_ANY_APP"


def verify_task(fab: Any, run_config: Any) -> str | None:
    """Check one task's FAB; the digest, or None when the site trusts any app.

    Raises
    ------
    AppNotTrusted
        If the site's trust file does not cover the app (or is missing).
    """
    from fedlora.app_trust import AppNotTrusted, TrustPolicy, fab_digest
    from fedlora.protocol import RUN_APP_SIGNATURE

    if os.environ.get(ENV_TRUST_ANY) == "1":
        return None
    path = os.environ.get(ENV_TRUSTED_APPS, "")
    if not path:
        raise AppNotTrusted(
            f"this node has no trusted-apps file ({ENV_TRUSTED_APPS} unset) and refuses "
            f"every app (app sha256:{fab_digest(fab.content)})"
        )
    signature = str(dict(run_config or {}).get(RUN_APP_SIGNATURE, ""))
    return TrustPolicy.load(path).check(fab.content, signature)


def main() -> None:
    """``flwr-clientapp`` with the app check (same arguments)."""
    from flwr.supernode.cli import flwr_clientapp
    from flwr.supernode.runtime import run_clientapp as runtime

    pull, install = runtime.pull_task_input, runtime.install_from_fab
    pulled: dict[str, Any] = {}

    def remembering_pull(client: Any) -> Any:
        message, context, run, fab = pull(client)
        pulled["run_config"] = context.run_config
        return message, context, run, fab

    def checked_install(content: bytes, *args: Any, **kwargs: Any) -> Any:
        # The one point where the FAB is in hand and none of it has run; the
        # task's message and context are already known, so a refusal here
        # becomes Flower's error reply to the server, with this reason.
        verify_task(_Fab(content), pulled.get("run_config"))
        return install(content, *args, **kwargs)

    runtime.pull_task_input = remembering_pull
    runtime.install_from_fab = checked_install  # type: ignore[assignment]
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


class _Fab:
    def __init__(self, content: bytes) -> None:
        self.content = content


if __name__ == "__main__":
    main()
