"""Pure ASGI middleware: request bodies over the size limit, or too slow, are refused.

* A ``Content-Length`` over the limit gets 413 before any of the body is read: at once
  without a token, else when the handler starts to read (after the token is checked, so the
  audit row names who sent it).
* A body sent without a length (chunked) is counted while it streams: 413 past the limit.
* A body still incomplete ``timeout`` seconds after the handler started to read it gets 408.

Handlers read bodies only after the token and the role are checked (see ``guard``), so a
refused caller's body is never read at all. When a response goes out before a large or chunked
body was read, it says ``Connection: close``: the server does not take in the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedaiot.serving import reasons
from fedaiot.serving.observe import audit_fields

_DRAINED = 1 << 16  # an unread body up to this size is drained by uvicorn (keep-alive stays)


def _declared(scope: Scope) -> tuple[int | None, bool, bool]:
    """(Content-Length or None, whether the body is chunked, whether there is an Authorization
    header); ValueError if the length is unparseable."""
    length: int | None = None
    chunked = authorized = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative Content-Length")
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"authorization":
            authorized = True
    return length, chunked, authorized


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: Callable[[], int], timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        try:
            length, chunked, authorized = _declared(scope)
        except ValueError:
            await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
            return
        oversized = length is not None and length > limit
        if oversized and not authorized:
            audit_fields(scope, reason=reasons.BODY_TOO_LARGE)
            detail = f"request body over {limit} bytes"
            headers = {"Connection": "close"}
            await JSONResponse({"detail": detail}, 413, headers)(scope, receive, send)
            return
        complete = not (chunked or length)
        seen = 0
        deadline: float | None = None

        async def limited_receive() -> Message:
            nonlocal seen, complete, deadline
            if complete:
                return await receive()
            if oversized:
                audit_fields(scope, reason=reasons.BODY_TOO_LARGE)
                raise HTTPException(413, f"request body over {limit} bytes")
            deadline = deadline or time.monotonic() + self.timeout
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    message = await receive()
            except TimeoutError:
                audit_fields(scope, reason=reasons.BODY_TIMEOUT)
                detail = f"request body not received within {self.timeout:g} s"
                raise HTTPException(408, detail) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    audit_fields(scope, reason=reasons.BODY_TOO_LARGE)
                    raise HTTPException(413, f"request body over {limit} bytes")
                complete = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            unread = not complete and (chunked or (length or 0) > _DRAINED)
            if message["type"] == "http.response.start" and unread:
                headers = [*message.get("headers", []), (b"connection", b"close")]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, limited_receive, closing_send)
