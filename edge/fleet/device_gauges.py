"""Per-box gauges for Prometheus, and the gateway's answer to "does the store answer?".

A poller thread reads every enrolled box's status from the store (``Store.statuses``, its own connection) every
``interval_s`` and keeps the latest snapshot; a Prometheus collector exports it with a ``device`` label: when the box
was last seen, its chain head, outbox backlog, open gaps, rejects, and whether its last status said online.

Invariants:
- Cardinality is bounded by the registry: only enrolled, unrevoked boxes get series (a stranger publishing under
  new ids creates none), and a box that is revoked or removed disappears at the next poll.
- The same poll is the store's health check: ``store_state`` says ``ok`` only if the latest poll succeeded and is
  recent (at most ``3 * interval_s`` old: a poll stuck in a call is not an answer).
- A failed poll never stops the gateway: it is logged (once per change of error), the connection is reopened next
  time, and the previous snapshot keeps being exported (the gauges say what was last known).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge.errors import EdgeError
from edge.fleet.store import Store
from edge.log import event

__all__ = ["DEVICE_METRICS", "DeviceGauges", "DeviceSample"]

log = logging.getLogger("edge.fleet.device_gauges")

# name -> (help, type): the per-device series (the "_total" suffix of the counter is added by the exposition).
DEVICE_METRICS: Final = {
    "edge_gateway_device_last_seen_timestamp_seconds": (
        "When the box was last heard from (status message or accepted envelope), Unix time",
        "gauge",
    ),
    "edge_gateway_device_online": (
        "1 if the box's last status message says online, 0 offline (none: never heard)",
        "gauge",
    ),
    "edge_gateway_device_chain_head": ("Counter of the box's latest accepted envelope", "gauge"),
    "edge_gateway_device_backlog_envelopes": ("Envelopes waiting in the box's outbox, from its last status", "gauge"),
    "edge_gateway_device_gaps": ("Open missing counters in the box's chain (not filled late)", "gauge"),
    "edge_gateway_device_rejects": ("Quarantined inputs attributed to the box, all days", "counter"),
}


@dataclass(frozen=True, slots=True)
class DeviceSample:
    """What one poll knew of one box (None: never heard / no such value yet)."""

    device_id: str
    last_seen: float | None
    online: bool | None
    head: int | None
    backlog: int | None
    gaps: int
    rejects: int


class DeviceGauges(Collector):
    """Polls the store for the boxes' status and exports it (register it in the gateway's registry).

    Args:
        open_store: opens a store connection (called on the poller thread).
        interval_s: seconds between polls.
        clock: monotonic seconds (the age of the last answer).
    """

    def __init__(
        self, open_store: Callable[[], Store], *, interval_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._open_store = open_store
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._samples: list[DeviceSample] = []
        self._answered: float | None = None  # monotonic time of the last successful poll
        self._error: str | None = "not checked yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._store: Store | None = None

    def start(self) -> None:
        """Start polling on a daemon thread (the first poll at once)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="device-gauges", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current poll and close the connection."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def store_state(self) -> str:
        """``ok`` if the store answered the latest poll recently, else why not (one line)."""
        with self._lock:
            answered, error = self._answered, self._error
        if error is not None:
            return error
        age = self._clock() - (answered or 0.0)
        if age > 3 * self.interval_s:
            return f"no answer for {age:.0f} s"
        return "ok"

    def samples(self) -> list[DeviceSample]:
        """The latest snapshot, ordered by device id."""
        with self._lock:
            return list(self._samples)

    def poll(self) -> None:
        """Read the boxes' status once (on the caller's thread, with this collector's connection).

        Raises:
            StoreError: the store failed (the connection is closed and reopened next time).
        """
        try:
            if self._store is None:
                self._store = self._open_store()
            revoked = {d.device_id for d in self._store.devices() if d.revoked_at is not None}
            statuses = self._store.statuses()
        except BaseException:
            self._close()
            raise
        samples = [
            DeviceSample(
                s.device_id,
                s.last_seen,
                None if s.state == "unknown" else s.state == "online",
                s.last_counter,
                s.outbox_backlog,
                s.gaps,
                s.rejects,
            )
            for s in statuses
            if s.device_id not in revoked
        ]
        with self._lock:
            self._samples = samples
            self._answered = self._clock()
            self._error = None

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    self.poll()
                except (EdgeError, OSError) as e:  # the store is down or broken: say so, keep the last snapshot
                    error = f"{type(e).__name__}: {e}"
                    with self._lock:
                        changed, self._error = self._error != error, error
                    if changed:
                        event(log, logging.WARNING, "store check failed", error=error, retry_s=self.interval_s)
                self._stop.wait(self.interval_s)
        finally:
            self._close()

    def _close(self) -> None:
        if self._store is not None:
            store, self._store = self._store, None
            store.close()

    def describe(self) -> Iterable[Metric]:
        """The metric families (without samples), so registering never polls."""
        return list(self._families([]))

    def collect(self) -> Iterable[Metric]:
        """The latest snapshot as metric families (called by each scrape)."""
        return list(self._families(self.samples()))

    @staticmethod
    def _families(samples: list[DeviceSample]) -> Iterator[Metric]:
        values: dict[str, Callable[[DeviceSample], float | None]] = {
            "edge_gateway_device_last_seen_timestamp_seconds": lambda s: s.last_seen,
            "edge_gateway_device_online": lambda s: None if s.online is None else float(s.online),
            "edge_gateway_device_chain_head": lambda s: s.head,
            "edge_gateway_device_backlog_envelopes": lambda s: s.backlog,
            "edge_gateway_device_gaps": lambda s: s.gaps,
            "edge_gateway_device_rejects": lambda s: s.rejects,
        }
        for name, (doc, kind) in DEVICE_METRICS.items():
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily(name, doc, labels=["device"])
                if kind == "counter"
                else GaugeMetricFamily(name, doc, labels=["device"])
            )
            for s in samples:
                v = values[name](s)
                if v is not None:  # never heard of, no chain yet: no sample rather than a made-up zero
                    family.add_metric([s.device_id], float(v))
            yield family
