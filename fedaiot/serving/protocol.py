"""uvicorn, configured for the service: header limits and timeouts, no trusted proxy by default.

uvicorn's httptools protocol has no header size limit and no time limit on receiving a
request's headers: a 16 MB header was taken in, and a client sending a byte every few seconds
kept a connection forever (each byte re-arms nothing; the keep-alive timer is cancelled on any
data). ``GuardedHttpTools`` adds both:

* a request line plus headers over ``max_header_bytes`` gets 431 and the connection closes;
* a connection must complete each request's headers within ``header_timeout_seconds`` of
  connecting or of its previous response: else 408 and the connection closes;
* a new connection from an address that has spent its budget of calls without a valid token
  is turned away by ``AddressGate`` before any parsing: held unanswered for a few seconds, then
  dropped. A client that retries at once is slowed to one try per hold; one that opens many
  connections finds them dropped at once past ``blocked_hold_max``. Either way a flood from one
  address costs little more than its accepts.

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

from fedaiot.serving.reasons import ADDRESS_BLOCKED, HEADER_TIMEOUT, HEADERS_TOO_LARGE
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


class AddressGate:
    """Turns away the connections of blocked addresses: held (not read, not answered) for
    ``hold_seconds``, at most ``max_held`` at a time, then dropped; the rest dropped at once."""

    def __init__(
        self,
        blocked: Callable[[str], bool],
        hold_seconds: float,
        max_held: int,
        on_refused: Callable[[str, str | None], None],
    ) -> None:
        self.blocked, self.hold_seconds, self.max_held = blocked, hold_seconds, max_held
        self.on_refused = on_refused
        self.held = 0

    def turn_away(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> bool:
        peer = transport.get_extra_info("peername")
        if not peer or not self.blocked(str(peer[0])):
            return False
        self.on_refused(ADDRESS_BLOCKED, str(peer[0]))
        if self.hold_seconds > 0 and self.held < self.max_held:
            self.held += 1
            transport.pause_reading()
            loop.call_later(self.hold_seconds, self._release, transport)
        else:
            transport.abort()
        return True

    def _release(self, transport: asyncio.Transport) -> None:
        self.held -= 1
        transport.abort()  # a no-op if the client has gone already


def guarded_protocol(
    max_header_bytes: int,
    header_timeout: float,
    on_refused: Callable[[str, str | None], None],
    gate: AddressGate | None = None,
) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a header size limit and a header timeout, turning
    away connections from the addresses ``gate`` blocks."""

    class GuardedHttpTools(HttpToolsProtocol):
        _in_headers = False  # a request has begun and its headers are not complete
        _header_bytes = 0
        _header_timer: asyncio.TimerHandle | None = None
        _gated = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if gate is not None and gate.turn_away(transport, asyncio.get_running_loop()):
                self._gated = True
                return
            super().connection_made(transport)
            self._arm_timer()

        def data_received(self, data: bytes) -> None:
            if self._gated:
                return
            # Counted from the read after the one a request began in (that one may also hold
            # the end of an earlier body): over the limit plus one read at most, then refused.
            counting = self._in_headers
            super().data_received(data)
            if counting and self._in_headers:
                self._header_bytes += len(data)
                if self._header_bytes > max_header_bytes:
                    self._refuse(_TOO_LARGE, HEADERS_TOO_LARGE)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_headers, self._header_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._cancel_timer()
            size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
            if size > max_header_bytes:
                self._refuse(_TOO_LARGE, HEADERS_TOO_LARGE)
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
            if self._gated:  # never set up: nothing to undo
                return
            self._cancel_timer()
            super().connection_lost(exc)

        def _arm_timer(self) -> None:
            self._cancel_timer()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _headers_late(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if not busy and not self.pipeline:  # idle, or still receiving a request's headers
                # An idle connection just closes: a 408 could cross a request being sent. Only a
                # connection that began a request, or never sent one, is a refusal to record.
                record = self._in_headers or self.cycle is None
                self._refuse(_TOO_SLOW if self._in_headers else b"", HEADER_TIMEOUT, record)

        def _cancel_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _refuse(self, response: bytes, reason: str, record: bool = True) -> None:
            self._in_headers = False
            self._cancel_timer()
            if record:
                on_refused(reason, self.client[0] if self.client else None)
            if not self.transport.is_closing():
                if response:
                    self.transport.write(response)
                self.transport.close()

    return GuardedHttpTools


def uvicorn_config(app: Any, settings: ServingSettings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of ``app`` (from ``create_app``) under ``settings``;
    ``options`` (log level, access log) are passed on."""
    refused = app.state.connection_refused
    gate = AddressGate(
        app.state.address_blocked,
        settings.blocked_hold_seconds,
        settings.blocked_hold_max,
        refused,
    )
    # Behind a proxy every connection comes from the proxy: no gate by address.
    use_gate = settings.block_flooding_addresses and not settings.trusted_proxies
    protocol = guarded_protocol(
        settings.max_header_bytes,
        settings.header_timeout_seconds,
        refused,
        gate if use_gate else None,
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
