"""The OpenAI Realtime door: ``WS /v1/realtime`` speaking the GA Realtime protocol.

A Realtime-protocol connection is a `DuplexSession` with a translator in front
(``bridge.py``): same tenants, store, REST history and limits as ``/v1/duplex``.
docs/openai-realtime.md lists what is supported and what differs.
"""
