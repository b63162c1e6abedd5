"""Error replies: how a node tells the server what went wrong, and no more.

A failure a person can fix comes back as an error reply naming the problem
(with a code from :mod:`fedlora.protocol`); anything unexpected is logged at
the node with its traceback and the server learns only the exception's type.
"""

from __future__ import annotations

import logging

from flwr.app import Error, Message

from fedlora.errors import FedloraError, PrivacyBudgetExceeded, PrivacyError
from fedlora.protocol import (
    ERROR_CODE_BUDGET,
    ERROR_CODE_INTERNAL,
    ERROR_CODE_PRIVACY,
    ERROR_CODE_USER,
)

log = logging.getLogger("fedlora.client")


def error_reply(msg: Message, exc: BaseException, code: int | None = None) -> Message:
    """An error reply carrying the actionable message to the server."""
    if code is None:
        code = (
            ERROR_CODE_BUDGET
            if isinstance(exc, PrivacyBudgetExceeded)
            else ERROR_CODE_PRIVACY
            if isinstance(exc, PrivacyError)
            else ERROR_CODE_USER
        )
    return Message(error=Error(code=code, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)


def failure_reply(msg: Message, exc: Exception, what: str) -> Message:
    """The reply for any failure of a handler.

    A :class:`FedloraError` carries a sentence written for people (what, value,
    fix). Anything else (an ``OSError`` from a disk, a bug) is logged here
    with its traceback, and the server is told only its type: a raw message
    or traceback can carry the site's paths and data.
    """
    if isinstance(exc, FedloraError):
        log.error("%s failed: %s", what, exc)
        return error_reply(msg, exc)
    log.exception("%s failed with an unexpected error", what)
    reason = (
        f"{type(exc).__name__}: internal error at the node during {what}; "
        "the node's log has the details"
    )
    return Message(error=Error(code=ERROR_CODE_INTERNAL, reason=reason), reply_to=msg)
