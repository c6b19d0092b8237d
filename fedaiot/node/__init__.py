"""An institution's node: one round of local training on its own data.

Owns the round (``round``: ask the budget, train, reply), DP-SGD itself (``training``), an
institution's files checked against the task (``local_data``), the deployed node's settings and
round (``deployed``), the guard that turns any error into a reason code (``guard``), and the
heap handed back to the system after every message (``memory``). May import ``config``,
``tasks``, ``wire``, ``privacy``; never the coordinator's side (``rounds``, ``registry``,
``serving``). Nothing here imports Flower except ``guard`` (its message types).
"""
