"""What the institution sees on its console while its SuperNode runs: one line per refusal.

Flower's SuperNode keeps running when it refuses a bundle (it answers the coordinator with an
error and logs it), and the ClientApp's refusals of a secure round go to the same log. This
follows the SuperNode's log and prints one plain line for each refused run and each refused
round, so an institution need not read Flower's log to know it was attacked.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

_RUN = re.compile(r"\[RUN (\d+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
UNSIGNED = "App verification is not supported by the connected SuperLink"
UNTRUSTED = "FAB verification failed"
_REFUSED_ROUND = re.compile(r"fedaiot node: \S+ failed \(protocol-error\): \w+: (.*refuses.*)$")


class RefusalWatcher:
    """Reads the SuperNode's log from ``offset`` and says each refusal once."""

    def __init__(self, log: Path, offset: int, trusted: list[str], say: Callable[[str], None]):
        self.log, self.offset, self.trusted, self.say = log, offset, trusted, say
        self.run = ""
        self.refused_runs: set[str] = set()
        # The ClientApp's refusal can reach the log through more than one handler (the kit's
        # runner logs as fedaiot and as Flower): each is said once.
        self.refused_rounds: set[tuple[str, str]] = set()
        self._partial = ""

    def lines(self, text: str) -> list[str]:
        """What to print for ``text``, the log's next bytes (a partial last line waits)."""
        out = []
        text = self._partial + text
        *complete, self._partial = text.split("\n")
        for raw in complete:
            line = _ANSI.sub("", raw)
            if found := _RUN.search(line):
                self.run = found.group(1)
            elif UNSIGNED in line or UNTRUSTED in line:
                if self.run in self.refused_runs:
                    continue
                self.refused_runs.add(self.run)
                why = (
                    "its app bundle carries no signature"
                    if UNSIGNED in line
                    else "its app bundle is signed by no key this institution trusts"
                )
                trusted = ", ".join(self.trusted)
                out.append(
                    f"refused run {self.run}: {why} (trusted: {trusted}); none of its code ran"
                )
            elif found := _REFUSED_ROUND.search(line):
                if (self.run, found.group(1)) in self.refused_rounds:
                    continue
                self.refused_rounds.add((self.run, found.group(1)))
                out.append(f"refused a secure round of run {self.run}: {found.group(1)}")
        return out

    def poll(self) -> None:
        try:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except OSError:
            return
        self.offset += len(data)
        for line in self.lines(data.decode(errors="replace")):
            self.say(line)


def watch(
    log: Path, offset: int, trusted: list[str], say: Callable[[str], None]
) -> Callable[[], None]:
    """Follow ``log`` in a thread; returns the function that stops it (after a last read)."""
    watcher = RefusalWatcher(log, offset, trusted, say)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            watcher.poll()
            time.sleep(0.5)

    thread = threading.Thread(target=loop, daemon=True, name="refusals")
    thread.start()

    def stopper() -> None:
        stop.set()
        thread.join(timeout=5)
        watcher.poll()

    return stopper
