"""The gateway's Prometheus metrics: what it received, what it accepted and rejected and why, gaps, and latency.

Each gateway process has its own registry (no process-global state, so tests can run several in one process) and
serves it on ``/metrics`` when ``[metrics] enabled``. Names follow Prometheus conventions (``_total`` counters,
``_seconds`` histograms); the reject reasons are the verifier's verdict names, so an alert can name the attack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

from edge.fleet.store import IngestResult
from edge.wire.chain import ACCEPTED, VerdictKind

__all__ = ["GatewayMetrics"]

_STATUS_OUTCOMES = ("recorded", "superseded", "cleared")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class GatewayMetrics:
    """The counters, gauges and histograms of one gateway process."""

    def __init__(self) -> None:
        """Create the metrics in a fresh registry."""
        r = self.registry = CollectorRegistry()
        self.envelopes = Counter("edge_gateway_envelopes", "Envelopes received, by verdict", ["verdict"], registry=r)
        self.records = Counter("edge_gateway_records", "Records in accepted envelopes", registry=r)
        self.rejects = Counter("edge_gateway_rejects", "Inputs quarantined, by reason", ["reason"], registry=r)
        self.missing = Counter("edge_gateway_missing_envelopes", "Envelope counters skipped by gaps", registry=r)
        self.statuses = Counter(
            "edge_gateway_status_messages",
            "Device status messages, by outcome (recorded, superseded, cleared, malformed)",
            ["outcome"],
            registry=r,
        )
        self.suspensions = Counter(
            "edge_gateway_suspensions", "Boxes suspended for overdrawing their reject budget", registry=r
        )
        self.receipts = Counter("edge_gateway_receipts", "Signed receipts published to boxes", registry=r)
        self.gaps = Counter("edge_gateway_gaps", "Gaps seen in the boxes' chains (each logged)", registry=r)
        self.store_errors = Counter("edge_gateway_store_errors", "Failed store transactions (retried)", registry=r)
        self.ack_lost = Counter(
            "edge_gateway_acks_lost", "Messages stored whose connection ended before the ack (redelivered)", registry=r
        )
        self.batch_size = Histogram(
            "edge_gateway_batch_messages",
            "Messages per store transaction",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.ingest_latency = Histogram(
            "edge_gateway_ingest_latency_seconds",
            "From receipt by the gateway to the committed store transaction",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.device_latency = Histogram(
            "edge_gateway_device_latency_seconds",
            "From the device sealing an envelope to the gateway storing it (device clock: indicative)",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rollouts = Counter(
            "edge_gateway_rollouts", "Rollouts that reached a state, by state", ["state"], registry=r
        )
        self.rollout_commands = Counter(
            "edge_gateway_rollout_commands",
            "Rollout commands published, by command and result (sent: the broker acknowledged it)",
            ["command", "result"],
            registry=r,
        )
        self.rollout_errors = Counter("edge_gateway_rollout_errors", "Rollout ticks that failed (retried)", registry=r)
        self.connected = Gauge("edge_gateway_connected", "1 while connected to the broker", registry=r)
        self.queue = Gauge("edge_gateway_queue_messages", "Messages received and not yet stored", registry=r)
        for kind in VerdictKind:
            self.envelopes.labels(verdict=kind.value)
            if kind not in ACCEPTED and kind is not VerdictKind.DUPLICATE:
                self.rejects.labels(reason=kind.value)
        for reason in ("internal", "shed"):  # not verdicts: a message that broke its batch, a QoS 0 flood
            self.rejects.labels(reason=reason)
        for outcome in (*_STATUS_OUTCOMES, "malformed"):
            self.statuses.labels(outcome=outcome)

    def observe(self, results: Sequence[IngestResult], *, stored_at: float, received_at: Sequence[float]) -> None:
        """Count one committed batch.

        Args:
            results: what ``Store.ingest`` returned.
            stored_at: when the transaction committed (gateway clock).
            received_at: when each message was received, in the order of ``results``.
        """
        self.batch_size.observe(len(results))
        for res, t in zip(results, received_at, strict=True):
            v = res.verdict
            self.ingest_latency.observe(max(0.0, stored_at - t))
            if v is None:
                if res.outcome in _STATUS_OUTCOMES or res.outcome == "malformed":
                    self.statuses.labels(outcome=res.outcome).inc()
                if not res.stored:
                    self.rejects.labels(reason=res.outcome).inc()
                continue
            self.envelopes.labels(verdict=v.kind.value).inc()
            if v.accepted:
                self.records.inc(len(v.records))
                if v.missing:
                    self.missing.inc(v.missing)
                if v.envelope is not None:
                    self.device_latency.observe(max(0.0, stored_at - v.envelope.created))
            elif not res.stored:
                self.rejects.labels(reason=v.kind.value).inc()

    def serve(self, host: str, port: int) -> Any:
        """Serve ``/metrics`` over HTTP on ``host:port`` from a daemon thread; returns the server (``shutdown()``)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what ``/metrics`` returns)."""
        return bytes(generate_latest(self.registry))
