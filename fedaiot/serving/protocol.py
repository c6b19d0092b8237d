"""uvicorn, configured for the service: header limits and timeouts, no trusted proxy by default.

uvicorn's httptools protocol has no header size limit and no time limit on receiving a
request's headers: a 16 MB header was taken in, and a client sending a byte every few seconds
kept a connection forever (each byte re-arms nothing; the keep-alive timer is cancelled on any
data). ``GuardedHttpTools`` adds both:

* a request line plus headers over ``max_header_bytes`` gets 431 and the connection closes;
* a connection must complete each request's headers within ``header_timeout_seconds`` of
  connecting or of its previous response: else 408 and the connection closes.

It subclasses uvicorn's protocol (pinned below 0.50 in pyproject.toml) and only adds to three
of its callbacks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from fedaiot.serving.settings import ServingSettings

log = logging.getLogger(__name__)


def _refusal(status: int, phrase: str, text: str) -> bytes:
    body = text.encode()
    return (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


_TOO_LARGE = _refusal(431, "Request Header Fields Too Large", "request headers too large")
_TOO_SLOW = _refusal(408, "Request Timeout", "request headers not received in time")


def guarded_protocol(
    max_header_bytes: int, header_timeout: float, on_refused: Callable[[str], None]
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header size limit and a header timeout."""

    class GuardedHttpTools(HttpToolsProtocol):
        _in_headers = False  # a request has begun and its headers are not complete
        _header_bytes = 0
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_timer()

        def data_received(self, data: bytes) -> None:
            # Counted from the read after the one a request began in (that one may also hold
            # the end of an earlier body): over the limit plus one read at most, then refused.
            counting = self._in_headers
            super().data_received(data)
            if counting and self._in_headers:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(_TOO_LARGE, "headers_too_large")

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._cancel_timer()
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > max_header_bytes:
                self._refuse(_TOO_LARGE, "headers_too_large")
                return
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self.transport.is_closing():  # not after a refusal
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self.transport.is_closing():
                super().on_message_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_timer()
            super().connection_lost(exc)

        def _arm_timer(self) -> None:
            self._cancel_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.pipeline:  # idle, or still receiving a request's headers
                # An idle connection just closes: a 408 could cross a request being sent.
                self._refuse(_TOO_SLOW if self._in_headers else b"", "header_timeout")

        def _cancel_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, response: bytes, reason: str) -> None:
            self._in_headers = False
            self._cancel_timer()
            on_refused(reason)
            if not self.transport.is_closing():
                if response:
                    self.transport.write(response)
                self.transport.close()

    return GuardedHttpTools


def uvicorn_config(app: Any, settings: ServingSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` under ``settings``; ``options`` (log level, access
    log) are passed on."""
    metrics = getattr(app.state, "metrics", None)
    protocol = guarded_protocol(
        settings.max_header_bytes,
        settings.header_timeout_seconds,
        metrics.connection_refused if metrics is not None else lambda reason: None,
    )
    return uvicorn.Config(
        app,
        http=protocol,
        lifespan="on",
        # Without a proxy in front, X-Forwarded-For is the caller's own text: never believed.
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        timeout_keep_alive=settings.keep_alive_seconds,
        limit_concurrency=settings.max_connections,
        server_header=False,
        **options,
    )
