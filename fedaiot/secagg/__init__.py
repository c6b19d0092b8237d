"""Secure aggregation (SecAgg+, Bell et al. CCS 2020; Bonawitz et al. CCS 2017) without Flower.

The guarantee. Against an honest-but-curious server that sees every message, a round reveals
only the weighted sum ``sum_i w_i x_i`` and the total weight ``sum_i w_i`` of the nodes whose
masked input arrived, even when nodes drop out mid-round, provided the nodes do not collude with
the server and the conditions checked by :class:`SecAggClient` hold. Secure aggregation hides
*which* node sent what; it is not differential privacy: the sum itself may still reveal
information, which DP noise added on each node addresses.

Against a *malicious* server, each node also holds an identity key and a pinned roster of the
federation's identity keys (:mod:`fedaiot.secagg.authentication`): advertisements are signed and
checked, and nodes confirm the survivor sets before unmasking.

What the caller must do: create one :class:`RoundSetup` per round (fresh round id and nonce),
one :class:`SecAggClient` per node and one :class:`SecAggServer`, carry the messages
(``to_record`` / ``from_record``) between them stage by stage, and abandon the round on any
:class:`SecAggError`. Bound every encoded value by ``max_abs`` (clip before masking).
"""

from fedaiot.secagg.authentication import NodeIdentity, Roster
from fedaiot.secagg.client import SecAggClient
from fedaiot.secagg.errors import (
    AuthenticationError,
    DisconnectedSurvivorsError,
    ProtocolViolation,
    SecAggError,
    TooFewSurvivorsError,
)
from fedaiot.secagg.graph import default_degree, default_threshold
from fedaiot.secagg.messages import (
    Confirmation,
    ConfirmRequest,
    ForwardedShares,
    KeyAdvert,
    MaskedInput,
    NeighbourKeys,
    ShareBundle,
    UnmaskRequest,
    UnmaskShares,
)
from fedaiot.secagg.parameters import SecAggParameters, choose, exposure_probability
from fedaiot.secagg.protocol import RoundTrace, run_round_in_memory
from fedaiot.secagg.quantize import Quantizer
from fedaiot.secagg.records import Record, record_size
from fedaiot.secagg.server import SecAggServer
from fedaiot.secagg.setup import RoundSetup

__all__ = [
    "AuthenticationError",
    "ConfirmRequest",
    "Confirmation",
    "DisconnectedSurvivorsError",
    "ForwardedShares",
    "KeyAdvert",
    "MaskedInput",
    "NeighbourKeys",
    "NodeIdentity",
    "ProtocolViolation",
    "Quantizer",
    "Record",
    "Roster",
    "RoundSetup",
    "RoundTrace",
    "SecAggClient",
    "SecAggError",
    "SecAggParameters",
    "SecAggServer",
    "ShareBundle",
    "TooFewSurvivorsError",
    "UnmaskRequest",
    "UnmaskShares",
    "choose",
    "default_degree",
    "default_threshold",
    "exposure_probability",
    "record_size",
    "run_round_in_memory",
]
