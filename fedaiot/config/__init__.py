"""The one typed configuration of a run (``run.RunConfig``), read from Flower's run config or
the CLI. Imports only ``fedaiot.errors`` and the names of the tasks: loading it never loads a
data set, torch or Flower."""
