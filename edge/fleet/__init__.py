"""The fleet side: everything that runs on the operator's servers, never on a box.

Nothing outside this package imports it (tests/test_architecture.py checks that); a box image does not install it
(the Yocto recipe puts it in the ``edge-fleet`` package, pip users get its dependencies with the ``fleet`` extra).
It speaks to boxes only through the contract package ``edge.wire`` and the MQTT adapter ``edge.mqtt``.

- ``gateway``: the ingest process (``edge gateway run``): ``ingest`` (fair queues, batches, acknowledgement after
  commit), ``config``, ``metrics``, ``suspend`` (reject budgets), ``broker_sync`` (the broker's access rules).
- ``store``: the ``Store`` protocol and ``open_store`` over SQLite or PostgreSQL.
- ``credit`` and ``claims``: the crediting rules of the work ledger; ``ledger``: its signed, re-verifiable exports.
- ``pki``: the CA and the device registry; ``models``: the TUF model repository; ``rollout``: staged rollouts.
- ``cli``: the ``edge fleet`` and ``edge gateway`` verbs; ``errors``: the fleet's error types.
"""
