"""The coordinator's ServerApp: read the run config and drive the rounds."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedaiot.config.polling import Polling
from fedaiot.config.run import RunConfig
from fedaiot.launch.flower_patches import patch_object_pulls
from fedaiot.rounds.exchanges import serverapp_grid
from fedaiot.rounds.loop import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    # The kit that started the SuperLink hands its waits down through the environment; the
    # reply loop replaces send_and_receive's 3 s, the patch the replies' 1 s first retry.
    polling = Polling.from_env()
    if not polling.stock:
        patch_object_pulls(polling)
    cfg = RunConfig.from_run_config(context.run_config)
    run_server(serverapp_grid(grid, polling, simulation_poll=cfg.simulation_poll), cfg)
