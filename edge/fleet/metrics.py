"""The gateway's Prometheus metrics: what it received, what it accepted and rejected and why, gaps, and latency.

Each gateway process has its own registry (no process-global state, so tests can run several in one process) and
serves it on ``/metrics`` when ``[metrics] enabled``, with ``/healthz`` beside it (200 or 503 and a small JSON body,
for a load balancer or systemd-independent probe). Names follow Prometheus conventions (``_total`` counters,
``_seconds`` histograms); the reject reasons are the verifier's verdict names, so an alert can name the attack.
Per-box series (``edge_gateway_device_*``) come from ``edge.fleet.device_gauges``. Every label value that can occur
is created up front, so ``increase()`` sees the first event of each (a rollout's first abort included).
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from edge.fleet.store import IngestResult
from edge.wire.chain import ACCEPTED, VerdictKind

__all__ = ["GatewayMetrics"]

_STATUS_OUTCOMES = ("recorded", "superseded", "cleared")
_ROLLOUT_STATES = ("running", "completed", "aborted")  # edge.fleet.rollout.planner's states
_ROLLOUT_COMMANDS = ("models/update", "models/rollback")  # and its commands (UPDATE, ROLLBACK)
Health = Callable[[], tuple[bool, dict[str, Any]]]
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
        self.store_up = Gauge("edge_gateway_store_up", "1 while the store answers the gateway's checks", registry=r)
        self.tuf_refreshes = Counter(
            "edge_gateway_tuf_refreshes",
            "TUF snapshot and timestamp re-signed by the gateway, by result (ok, failed)",
            ["result"],
            registry=r,
        )
        self.tuf_timestamp_expiry = Gauge(
            "edge_gateway_tuf_timestamp_expiry_timestamp_seconds",
            "When the repository's current timestamp metadata expires, Unix time (0 until checked)",
            registry=r,
        )
        for result in ("ok", "failed"):
            self.tuf_refreshes.labels(result=result)
        for state in _ROLLOUT_STATES:
            self.rollouts.labels(state=state)
        for command in _ROLLOUT_COMMANDS:
            for sent in ("sent", "failed"):
                self.rollout_commands.labels(command=command, result=sent)
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

    def serve(self, host: str, port: int, health: Health | None = None) -> Any:
        """Serve ``/metrics`` (and ``/healthz`` when ``health`` is given) on ``host:port`` from a daemon thread.

        Args:
            host: the address to bind (``metrics.host``).
            port: the port (``metrics.port``).
            health: returns (healthy, details); ``/healthz`` answers 200 or 503 with the details as JSON.

        Returns:
            The server (``shutdown()``, ``server_close()``).

        Raises:
            OSError: the address cannot be bound (the port is in use...); the message names it and its keys.
        """
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            if health is None or environ.get("PATH_INFO") != "/healthz":
                return metrics_app(environ, start_response)  # type: ignore[no-any-return]
            ok, details = health()
            body = json.dumps(details, separators=(",", ":")).encode() + b"\n"
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            start_response("200 OK" if ok else "503 Service Unavailable", [*headers, ("Cache-Control", "no-store")])
            return [body]

        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

            class Server(ThreadingWSGIServer):
                address_family = family  # an IPv6 metrics.host binds only with its own family

            server = make_server(host, port, app, Server, handler_class=_QuietHandler)
        except OSError as e:  # the socket's error names no address: name it, and the key that sets it
            raise OSError(e.errno, e.strerror, f"{host}:{port} (metrics.host, metrics.port)") from e
        threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
        return server

    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what ``/metrics`` returns)."""
        return bytes(generate_latest(self.registry))


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape: Prometheus scrapes every few seconds, the log is for events."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""
