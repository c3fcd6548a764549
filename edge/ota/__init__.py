"""Over-the-air model updates on the box: TUF trust, A/B model slots, a health-gated commit (docs/ota.md).

- ``trust``: the TUF client (python-tuf's ngclient) that decides which release may be installed;
- ``fetch``: the resumable, length-bounded downloader it uses; ``clock``: the time floor for boxes without a
  real-time clock;
- ``state``: the update's states and its (state, event) -> state table, persisted atomically; ``slots``: the A/B
  model slots and the atomic ``active`` link; ``trial``: the health gate (golden samples, latency budget) a candidate
  passes in its own onnxruntime session;
- ``updater``: one update from download to commit or rollback, driven by the table; ``agent``: runs it inside
  ``edge run`` and swaps the pipeline's model on commit;
- ``errors``: the OTA errors and the ``reason`` each reports; ``_faults``: named crash points for the kill tests.

The release format (custom metadata, golden samples) is the contract's: ``edge.wire.manifest``.
"""
