"""The embedded MQTT broker: a sans-IO core and a thin trio adapter (DESIGN.md, decision 2).

Module map: ``connection`` (one client connection as a state machine),
``sessions`` (what outlives a connection), ``subscriptions`` (the filter
index, shared subscriptions), ``state`` (sessions, subscriptions, retained
messages and Wills together), ``persistence`` (away sessions across restarts,
SQLite), ``listener`` (sockets, caps, TLS) and ``embedded`` (the trio tasks).
Only the last two do I/O.
"""
