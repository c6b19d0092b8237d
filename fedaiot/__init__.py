"""fedaiot: federated learning with record-level differential privacy and secure aggregation.

The packages, lowest layer first (each may import only from the layers above it in this list,
and ``fedaiot.errors`` from anywhere); ``docs/architecture.md`` draws the same picture:

* ``errors``: the one exception hierarchy, each class with its CLI exit code;
* ``config``: ``RunConfig``, the one typed configuration of a run;
* ``tasks``: data sets, models and their evaluation, and the split into nodes;
* ``wire``: what a node's reply holds and which of it crosses the wire in the clear;
* ``privacy``: the secure generator, accounting, the ledger and the budget rules;
* ``secagg``: SecAgg+ itself, without Flower;
* ``node``: an institution's round: its data, its budget, DP-SGD;
* ``secure_rounds``: SecAgg+'s stages as Flower messages, both sides;
* ``registry``: signed, versioned global models;
* ``rounds``: the coordinator's round loop around Flower's strategies;
* ``simulation``, ``launch``, ``deploy``: running it all (simulated, or real processes);
* ``serving``: the inference service; ``experiments``: sweeps and reports;
* ``cli``: the ``fedaiot`` command.
"""
