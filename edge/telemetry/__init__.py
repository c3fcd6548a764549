"""The box's uplink: signed telemetry out, signed commands in.

``sink`` batches records into envelopes (``edge.wire.envelope``) and keeps them in the durable ``outbox``;
``publisher`` moves them to the broker through ``edge.mqtt`` within a window of unacknowledged messages; ``control``
executes the fleet's commands once ``edge.wire.commands`` has verified them, with the nonce set persisted by
``nonces``; ``device`` wires these together for one box. The wire format itself is the contract package's
(``edge.wire``, docs/telemetry.md).
"""
