"""The coordinator's round loop (``loop``): sample nodes, collect and check their replies,
aggregate through Flower's strategies (securely by default), evaluate, register, resume; with
the run's journal (``journal``), the strategy's saved state (``strategy_state``) and the
message exchanges, counted and (deployed) waited for without Flower's fixed sleep
(``exchanges``). May import ``config``, ``tasks``, ``wire``, ``privacy.disclosure``,
``secure_rounds``, ``registry``; never the node's training stack."""
