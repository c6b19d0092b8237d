"""Secure aggregation on Flower: SecAgg+'s stages as message exchanges.

``driver``: the coordinator's side (one secure round over a Flower grid), with ``stages`` (each
exchange, each reply parsed) and ``keys`` (the next round's keys, advertised with this round's
unmask answers); ``handlers``: the node's side (one function per stage message, the round's
secrets kept in Flower's ``Context.state``); ``wire``: SecAgg records and flat model vectors as
Flower records. May import ``secagg``, ``wire``, ``config`` and, on the node's side,
``privacy.budget``.
"""
