"""The one launcher of Flower processes: start a SuperLink, a SuperNode or a run, wait for it,
follow the coordinator's journal, and stop whole process trees. Every subprocess fedaiot starts
is started here. May import ``errors``, ``config`` and ``rounds.journal``."""
