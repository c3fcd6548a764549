"""Receipts from the gateway: after a batch committed, each box whose envelopes it held is told what is stored.

``ReceiptIssuer`` runs on the ingest thread (the store is per-thread): the ingest loop calls ``note`` with the boxes
of every committed batch, and ``issue`` on every turn. A receipt (``edge.wire.receipts``) is computed from the
committed store (``Store.delivery_states``), signed with the fleet receipt key and published retained, QoS 1, on
``devices/<id>/receipts``, where the box's persistent session receives it and a new session finds the latest.

Invariants:
- A receipt is computed only from committed state, read after the commit: it never says stored of what a rollback
  could undo.
- At most one receipt per box per ``interval_s`` (a box sealing an envelope a second costs a receipt a second, not
  one per envelope of a resend burst); a box asking (its birth status after a (re)connect, ``note(force=True)``) is
  answered within ``min(interval_s, 1 s)`` of its previous receipt, so a box flooding its status topic earns at most
  one receipt a second. A box noted while its receipt is not due stays pending, never forgotten.
- A failure to read the store or to publish is logged and the boxes stay pending: the next turn retries. Ingest
  never stops for a receipt.
- Boxes the store does not know get no receipt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import EdgeError, TransportError
from edge.fleet.metrics import GatewayMetrics
from edge.fleet.store import Store
from edge.log import event
from edge.wire.receipts import Receipt, ReceiptError, holes_between, sign_receipt
from edge.wire.topics import device_topics

__all__ = ["DEFAULT_INTERVAL_S", "ReceiptIssuer"]

log = logging.getLogger("edge.fleet.receipts")

DEFAULT_INTERVAL_S: Final = 0.5
_MAX_PER_TURN: Final = 1000  # receipts per turn: a burst of many boxes never holds the ingest thread for long
_RETRY_S: Final = 1.0
_ASKED_MIN_S: Final = 1.0  # the least time between two receipts a box asked for (a status flood costs one a second)

Publish = Callable[[str, bytes], object]


class ReceiptIssuer:
    """Tracks the boxes owed a receipt and issues them.

    Args:
        key: the fleet receipt key.
        gateway_id: this gateway's id (carried in the receipt).
        publish: ``publish(topic, payload)`` retained at QoS 1 (``MqttTransport.publish``); may raise
            ``TransportError`` when not connected.
        interval_s: the least time between two receipts for one box.
        metrics: where receipts are counted (None: nowhere).
        clock: epoch seconds (the receipt's ``issued``).
        monotonic: seconds for the interval.
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        gateway_id: str,
        publish: Publish,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        metrics: GatewayMetrics | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._key = key
        self.gateway_id = gateway_id
        self._publish = publish
        self.interval_s = max(0.0, interval_s)
        self._metrics = metrics
        self._clock = clock
        self._mono = monotonic
        self._pending: dict[str, bool] = {}  # device -> forced (asked)
        self._last: dict[str, float] = {}  # device -> when its last receipt went out (monotonic)
        self._retry_at = 0.0
        self.issued = 0
        self.failures = 0

    def note(self, device_ids: Iterable[str], *, force: bool = False) -> None:
        """Boxes whose envelopes a committed batch stored (or found stored), or that asked (``force``)."""
        pending = self._pending
        for dev in device_ids:
            pending[dev] = force or pending.get(dev, False)

    def due_in(self) -> float | None:
        """Seconds until the next pending receipt is due (0: now), None when nothing is pending."""
        if not self._pending:
            return None
        now = self._mono()
        if now < self._retry_at:
            return self._retry_at - now
        soonest = min(self._last.get(dev, -1e18) + self._gap(forced) - now for dev, forced in self._pending.items())
        return max(0.0, soonest)

    def _gap(self, forced: bool) -> float:
        return min(self.interval_s, _ASKED_MIN_S) if forced else self.interval_s

    def issue(self, store: Store) -> int:
        """Sign and publish the receipts that are due.

        Args:
            store: the ingest thread's store.

        Returns:
            How many receipts were published.
        """
        now = self._mono()
        if not self._pending or now < self._retry_at:
            return 0
        due = [dev for dev, forced in self._pending.items() if now - self._last.get(dev, -1e18) >= self._gap(forced)][
            :_MAX_PER_TURN
        ]
        if not due:
            return 0
        try:
            states = store.delivery_states(due)
        except EdgeError as e:
            self._failed("receipts not computed", e, len(due))
            return 0
        sent = 0
        issued = self._clock()
        for dev in due:
            state = states.get(dev)
            if state is None:  # not registered: nothing to say, and nobody to say it to
                self._pending.pop(dev, None)
                continue
            start, holes = holes_between(state.missing, state.stored, state.head)
            receipt = Receipt(
                device_id=dev,
                stored=state.stored,
                stored_hash=state.stored_hash,
                head=state.head,
                head_hash=state.head_hash,
                start=start,
                holes=holes,
                issued=issued,
                gateway=self.gateway_id,
            )
            try:
                signed = sign_receipt(receipt, self._key)
            except ReceiptError as e:
                # A state the format cannot state (a bug, never the box's doing): this box waits for its next batch,
                # the others are not held up behind it.
                self._pending.pop(dev, None)
                self.failures += 1
                event(log, logging.ERROR, "receipt not signed", device=dev, error=str(e)[:300])
                continue
            try:
                self._publish(device_topics(dev)["receipts"], signed)
            except (TransportError, ValueError) as e:
                self._failed("receipt not published", e, len(due) - sent)
                break
            self._pending.pop(dev, None)
            self._last[dev] = now
            sent += 1
        self.issued += sent
        if self._metrics is not None and sent:
            self._metrics.receipts.inc(sent)
        if len(self._last) > 4 * max(len(self._pending), 10_000):
            # Forget boxes that have not needed a receipt for a while: memory stays bounded by the active fleet.
            horizon = now - max(self.interval_s, 60.0)
            self._last = {d: t for d, t in self._last.items() if t >= horizon}
        return sent

    def _failed(self, what: str, e: BaseException, n: int) -> None:
        self.failures += 1
        self._retry_at = self._mono() + _RETRY_S
        event(log, logging.WARNING, what, error=f"{type(e).__name__}: {e}"[:300], pending=n)
