"""The contract between a box and its fleet: what goes over the wire and how either side checks it.

Everything here is sans-IO (bytes and an explicit ``now`` in, values or typed errors out) and imports neither the
box (``edge.telemetry``, ``edge.ota``, ...) nor the fleet (``edge.fleet``): tests/test_architecture.py checks that.

- ``_cbor``, ``cose``: strict CBOR and the COSE_Sign1 profile (EdDSA) every signed message uses;
- ``records``, ``schema``: the records a box emits and their CBOR schema under ``TelemetryLimits``;
- ``envelope``: signed, hash-chained envelopes of records; ``chain``: the verifier of a device's chain;
- ``commands``: the fleet's signed commands, their signer and the box's verifier;
- ``topics``: every MQTT topic, built and parsed once; ``manifest``: the model release manifest;
- ``_bounds``: limits shared by all of them; ``errors``: the malformed-input errors.

The formats are specified in docs/telemetry.md, docs/commands.md and docs/ota.md.

The package itself imports nothing: ``edge.wire.records`` is on every box's hot path, and importing it must not load
the COSE, chain and cryptography modules a box that writes JSON lines never uses. Import from the modules.
"""
