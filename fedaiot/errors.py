"""The one exception hierarchy of fedaiot; each class carries its CLI exit code.

::

    FedaiotError                 1  anything fedaiot refuses or cannot do
    ├── BadInputError            2  a configuration, file, name or value that cannot be used
    │   └── SecurityError        2  a signature, hash, token or protocol message that fails a check
    ├── PrivacyBudgetError       3  the privacy budget cannot pay for what was asked
    ├── NothingLearnedError      4  a run in which no round aggregated any update
    └── FlowerRuntimeError       1  a Flower process (SuperLink, SuperNode, run) failed or vanished

Every module raises a subclass of one of these (``ConfigError(BadInputError)``,
``LocalDataError(BadInputError)``, ``BudgetExhaustedError(PrivacyBudgetError)``, ...), and
the CLIs catch :class:`FedaiotError` alone: its ``exit_code`` is the command's exit status and
its message the one line printed. ``reason`` is the code a node sends the coordinator instead of
the message (``fedaiot.wire.replies.REASONS``): the message may quote the node's data.

Classes also derive from the built-in they replaced (``ValueError`` for bad input,
``RuntimeError`` for the rest), so code that caught those still does.
"""

from __future__ import annotations


class FedaiotError(Exception):
    exit_code = 1
    reason = "internal-error"


class BadInputError(FedaiotError, ValueError):
    exit_code = 2
    reason = "config-error"


class SecurityError(BadInputError):
    reason = "protocol-error"


class PrivacyBudgetError(FedaiotError, RuntimeError):
    exit_code = 3
    reason = "budget-exhausted"


class NothingLearnedError(FedaiotError, RuntimeError):
    exit_code = 4


class FlowerRuntimeError(FedaiotError, RuntimeError):
    exit_code = 1
