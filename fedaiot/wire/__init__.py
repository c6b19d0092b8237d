"""What crosses the wire between a node and the coordinator, in the clear.

``replies``: a node's reply, its reason codes and which metrics each mode may send (the one
place that decides it); ``records``: those replies as Flower records, and the coordinator's
checks of every reply; ``packing``: a message's whole content as one record on the wire
(fewer Flower objects, fewer requests). May import Flower and ``fedaiot.errors``; nothing
else of fedaiot, so that both sides can import it without the other's stack.
"""
