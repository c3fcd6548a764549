"""The fleet gateway: storage of devices and verified telemetry, ingest, the work ledger.

Modules: ``store`` (the ``Store`` protocol, record types and ``open_store`` over SQLite or PostgreSQL), ``ledger``
(self-contained exports of a device's verified work and their third-party re-verification), ``errors``.
"""
