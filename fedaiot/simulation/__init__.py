"""Simulated federations: ``engine`` runs the real apps through Flower's simulation engine
(via ``launch``), ``inprocess`` runs them in this process without Ray (tests, tuning), and
``faults`` plays drop-outs and stragglers. May import every layer below ``simulation``."""
