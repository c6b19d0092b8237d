"""The institution's kit: ``python -m clients.institution schema|check|start``.

The same commands as ``fedaiot node ...``; see docs/deployment.md. The ClientApp that the
SuperNode runs is ``clients/client_app.py``: with ``data-path`` in its node config it trains
on the institution's own file instead of a simulated partition.
"""

from __future__ import annotations

from fedaiot.cli.deploy import node_app


def main() -> None:
    node_app(prog_name="python -m clients.institution")


if __name__ == "__main__":
    main()
