"""Alert events to a webhook: each POSTed as JSON by one background thread, never blocking the
service. A bounded queue (events past it are dropped and counted), a timeout per call, one
retry; what could not be delivered is counted and logged, never raised.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from typing import Any

log = logging.getLogger(__name__)
_RETRY_AFTER = 1.0


class WebhookSender:
    def __init__(
        self,
        url: str,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
        queue_size: int = 1000,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.headers = {"Content-Type": "application/json", **(headers or {})}
        self.sent = 0
        self.failures = 0  # events not delivered (after the retry), or dropped from a full queue
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(queue_size)
        self._thread = threading.Thread(target=self._run, name="fedaiot-webhook", daemon=True)
        self._thread.start()

    def send(self, payload: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(payload)
        except queue.Full:
            self.failures += 1
            log.error("webhook %s: queue full, an alert event was dropped", self.url)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (within ``timeout``), then stop."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _post(self, body: bytes) -> None:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:
            answer.read(65536)

    def _run(self) -> None:
        while (payload := self._queue.get()) is not None:
            body = json.dumps(payload).encode()
            for attempt in (1, 2):
                try:
                    self._post(body)
                    self.sent += 1
                    break
                except (urllib.error.URLError, OSError, ValueError) as exc:
                    if attempt == 2:
                        self.failures += 1
                        log.error("webhook %s: an alert event was not delivered: %s", self.url, exc)
                    else:
                        time.sleep(_RETRY_AFTER)
