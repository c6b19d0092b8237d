"""The coordinator's kit: ``python -m server.coordinator provision|start|serve``.

The same commands as ``fedaiot provision`` and ``fedaiot coordinator start|serve``; see
docs/deployment.md. The ServerApp that the SuperLink runs is ``server/server_app.py``.
"""

from __future__ import annotations

from fedaiot.cli.deploy import coordinator_app


def main() -> None:
    coordinator_app(prog_name="python -m server.coordinator")


if __name__ == "__main__":
    main()
