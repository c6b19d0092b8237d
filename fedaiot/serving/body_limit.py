"""Pure ASGI middleware: request bodies over the size limit, or too slow, are refused.

* A ``Content-Length`` over the limit gets 413 at once: nothing of the body is read.
* A body sent without a length (chunked) is counted while it streams: 413 past the limit.
* A body still incomplete ``timeout`` seconds after the handler started to read it gets 408.

It runs after ``Authenticate``: a caller without a valid token is refused (401) before this,
and a refused caller's body is never read at all. When a response goes out before a large or chunked
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


def _declared(scope: Scope) -> tuple[int | None, bool]:
    """(Content-Length or None, whether the body is chunked); ValueError if unparseable."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = int(value)
            if length < 0:
                raise ValueError("negative Content-Length")
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
    return length, chunked


def close_if_unread(scope: Scope) -> dict[str, str]:
    """``Connection: close`` for a response sent before the body was read, if that body is
    large or unbounded (chunked): the server should not take it in just to discard it."""
    try:
        length, chunked = _declared(scope)
    except ValueError:
        return {"Connection": "close"}
    return {"Connection": "close"} if chunked or (length or 0) > _DRAINED else {}


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: Callable[[], int], timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit()
        try:
            length, chunked = _declared(scope)
        except ValueError:
            await JSONResponse({"detail": "invalid Content-Length"}, 400)(scope, receive, send)
            return
        if length is not None and length > limit:
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
