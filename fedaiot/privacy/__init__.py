"""Record-level differential privacy on a node: the secure generator (``randomness``), the
accountant (``accounting``), the ledger of one data set (``ledger``), the budget rules
(``budget``) and what a run disclosed to the coordinator (``disclosure``). May import
``config``, ``tasks`` (types) and ``wire.replies``."""
