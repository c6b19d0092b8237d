"""The coordinator's ServerApp: read the run config and drive the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedaiot.config.run import RunConfig
from fedaiot.rounds.loop import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, RunConfig.from_run_config(context.run_config))
