"""A node's failures on the wire: a reason code for the coordinator, the detail in its own log.

An exception's text can quote the institution's data (a cell value) or its file paths; Flower
would copy it into the error reply, and the coordinator into its journal. Every ClientApp
handler is therefore :func:`guarded`: whatever it raises is logged on the node, and the reply
carries only the code of :data:`fedaiot.wire.replies.REASONS` that the exception's class names in
its ``reason`` attribute (``internal-error`` for any other).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

from flwr.app import Context, Message

from fedaiot.wire.replies import REASONS, failure

LOG = logging.getLogger("fedaiot.node.round")
Handler = Callable[[Message, Context], Message]


def reason_of(exc: BaseException) -> str:
    reason = getattr(type(exc), "reason", "internal-error")
    return reason if reason in REASONS else "internal-error"


def guarded(handler: Handler) -> Handler:
    """``handler`` with every exception turned into a failure reply that names only a code."""

    @functools.wraps(handler)
    def wrapper(message: Message, context: Context) -> Message:
        try:
            return handler(message, context)
        except Exception as exc:
            reason = report_failure(message.metadata.message_type, exc, context, message)
            from fedaiot.wire.records import reply_content

            content = reply_content(failure("", reason), private=True)
            return Message(content=content, reply_to=message)

    return wrapper


def report_failure(
    message_type: str, exc: Exception, context: Context, message: Message | None = None
) -> str:
    """Log why the node failed ``message_type`` (in its log and, deployed, its round log) and
    return the reason code that may go on the wire. Also for a part of a message that fails
    alone: the next round's shares in an unmask answer."""
    reason = reason_of(exc)
    LOG.log(
        logging.ERROR if reason == "internal-error" else logging.WARNING,
        "fedaiot node: %s failed (%s): %s: %s",
        message_type,
        reason,
        type(exc).__name__,
        exc,
        exc_info=reason == "internal-error",
    )
    _on_console(message_type, message, context, reason, exc)
    return reason


def _on_console(
    message_type: str, message: Message | None, context: Context, reason: str, exc: Exception
) -> None:
    """A deployed node's failure, in its round log (its console shows it with the detail)."""
    from fedaiot.node.deployed import DATA_PATH, NodeSettings

    if DATA_PATH not in context.node_config:
        return
    from fedaiot.node.round_log import record, what_of

    try:
        settings = NodeSettings.from_node_config(context.node_config)
        config = message.content.config_records.get("config") if message is not None else None
        what = what_of(dict(config)) if config is not None else message_type
    except Exception:  # the failure itself may be a broken node config: the log has it
        return
    record(settings, what=what, status="failed", reason=reason, detail=f"{exc}")
