"""The MQTT 3.1.1 and 5.0 codec, sans-IO: bytes to packets and back, for a broker or a client.

One codec for the broker (``protocols/mqtt/server``), the external-broker
client (``protocols/mqtt/external.py``) and the device simulator
(``firmware_examples/simulator``). It imports only the standard library and
itself, so the simulator can use it without pulling in the agent.

Theory of operation
-------------------
A byte stream goes through :class:`FrameSplitter`, which cuts it into
:class:`Frame` values (type, flags, body) and refuses a frame over the size
bound before buffering its body. :func:`decode_connect` reads the first frame
of a connection and tells the protocol level (4: 3.1.1, 5: 5.0); every later
frame goes through :func:`decode` with that level. The other way,
:func:`encode` turns any packet value into bytes for a given level, and the
``encode_*`` functions build the frequent ones from their fields directly.
Everything a peer can get wrong raises :class:`ProtocolViolation`, whose
``reason`` labels the refusal metric and whose ``code`` is the MQTT 5
reason code to tell a v5 peer. Nothing here does I/O or reads a clock.

Module map: ``spec`` (constants, reason codes, the error), ``wire`` (data
representations, frame splitting), ``properties`` (MQTT 5 properties),
``packets`` (packet values), ``decode``, ``encode``, ``filters`` (topic
filters, ``$share/``).
"""

from __future__ import annotations

from .decode import decode, decode_connect, decode_packet_id, decode_publish
from .encode import DISCONNECT_BYTES, PINGREQ_BYTES, PINGRESP_BYTES, connack_code, encode, encode_ack, encode_auth
from .encode import encode_connack, encode_connect, encode_disconnect, encode_pingreq, encode_puback, encode_pubcomp
from .encode import encode_publish, encode_pubrec, encode_pubrel, encode_refusal_for, encode_suback, encode_subscribe
from .encode import encode_unsuback, encode_unsubscribe
from .filters import SHARE_PREFIX, FilterError, TopicFilter, check_filter, matches, parse_filter
from .packets import PING_REQUEST, PING_RESPONSE, Ack, Auth, Connack, Connect, Disconnect, Packet, Ping, Publish
from .packets import Suback, Subscribe, Subscription, Unsuback, Unsubscribe, Will
from .properties import NO_PROPERTIES, PROPERTY_TABLE, Properties, pack_properties, read_properties
from .spec import AUTH, CONNACK, CONNECT, DISCONNECT, FROM_CLIENT, FROM_SERVER, MAX_FILTERS, MAX_PACKET_ID
from .spec import MAX_TOPIC_BYTES, MQTT_5, MQTT_311, PACKET_NAMES, PINGREQ, PINGRESP, PUBACK, PUBCOMP, PUBLISH
from .spec import PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE, ConnectReturn, ProtocolViolation
from .spec import V5_TO_V311_CONNACK, V311_TO_V5_CONNACK, ReasonCode, UnsupportedProtocol
from .wire import Cursor, Frame, FrameSplitter, pack_frame

# The 3.1.1 CONNACK return codes by their old names.
ACCEPTED, BAD_PROTOCOL, IDENTIFIER_REJECTED, SERVER_UNAVAILABLE, BAD_CREDENTIALS, NOT_AUTHORIZED = range(6)
