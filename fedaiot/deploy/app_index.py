"""The coordinator's app index: hands its own SuperLink the approved bundle with its signatures.

Flower 1.41's SuperLink passes signatures on to the SuperNodes only for bundles it fetched from
an app index (Flower Hub); a bundle submitted from a folder reaches the nodes unsigned, and a
node started with ``--trusted-entities`` refuses it. The SuperLink asks the index named by
``FLWR_SUPERGRID_API_URL``: ``POST /hub/fetch-fab`` answers the bundle's URL and its
verifications, and the SuperLink downloads the bundle from that URL. This index answers those
two requests, for one bundle, on 127.0.0.1 only, for as long as the coordinator's kit runs.

It adds no trust of its own: the nodes check the signatures against keys they listed
themselves, so an index that served another bundle or forged a signature would only get the
run refused.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedaiot.deploy.bundle import Approval, Bundle

INDEX_ENV = "FLWR_SUPERGRID_API_URL"
_FETCH = "/hub/fetch-fab"


class _Handler(BaseHTTPRequestHandler):
    server: _IndexServer

    def _answer(self, status: int, body: bytes, kind: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        try:
            asked = json.loads(self.rfile.read(length) or b"{}")
        except ValueError:
            asked = {}
        bundle = self.server.bundle
        wanted = asked.get("app_id") == bundle.app_id and asked.get("app_version") in (
            None,
            bundle.version,
        )
        if self.path != _FETCH or not wanted:
            detail = f"this index serves {bundle.spec} only"
            self._answer(404, json.dumps({"detail": detail}).encode())
            return
        answer: dict[str, Any] = {
            "fab_url": f"{self.server.url}/fab/{bundle.sha256}",
            "verifications": [a.record() for a in self.server.approvals],
        }
        self._answer(200, json.dumps(answer).encode())

    def do_GET(self) -> None:
        if self.path != f"/fab/{self.server.bundle.sha256}":
            self._answer(404, b"{}")
            return
        self._answer(200, self.server.bundle.path.read_bytes(), "application/octet-stream")

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the SuperLink's own log records every run it starts


class _IndexServer(ThreadingHTTPServer):
    bundle: Bundle
    approvals: list[Approval]
    url: str


@contextmanager
def serve_bundle(bundle: Bundle, approvals: list[Approval]) -> Iterator[str]:
    """Serve ``bundle`` and its approvals on a free loopback port; yields the index's URL."""
    server = _IndexServer(("127.0.0.1", 0), _Handler)
    server.bundle, server.approvals = bundle, approvals
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="app-index")
    thread.start()
    try:
        yield server.url
    finally:
        server.shutdown()
        server.server_close()
