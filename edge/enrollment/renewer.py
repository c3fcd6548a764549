"""Certificate renewal inside the running service: a thread that renews the box's certificate before it expires.

Device certificates are short-lived (30 days by default), so a box renews when a third of the lifetime is left
(``renewal_due``), which leaves ten days of retries for a box that is offline. The MQTT transport loads its TLS
credentials for every connection, so the next reconnect uses the new certificate; the current connection, already
authenticated, goes on.

What the thread says, once per kind of trouble and then at most hourly (``edge.log.Throttle``):
- the endpoint is unreachable: warning, retried every ``retry_s``;
- the endpoint refuses (the box was revoked) or the certificate has expired: error, "the box must be claimed again";
- the box was enrolled by hand (no enrollment record): renewal is off, said once at info level.
"""

from __future__ import annotations

import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Final

from cryptography import x509

from edge.config import Config
from edge.enrollment.client import EnrollRefusedError, EnrollUnavailableError
from edge.enrollment.procedure import KeyFiles, certificate_times, renew, renewal_due
from edge.errors import ConfigError, InputError
from edge.log import Throttle, event

__all__ = ["Renewer"]

log = logging.getLogger(__name__)

_CHECK_S: Final = 3600.0
_RETRY_S: Final = 600.0


def _iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="seconds")


class Renewer:
    """Renews the certificate of an enrolled box in the background.

    Args:
        cfg: the configuration (where the certificate and the enrollment record are).
        check_s: seconds between checks while the certificate is fresh.
        retry_s: seconds between attempts while a renewal is due and fails.
        clock: wall-clock seconds (certificate times are wall-clock).
        renew_fn: the renewal (``edge.enrollment.procedure.renew``; tests pass one with other timeouts).
    """

    def __init__(
        self,
        cfg: Config,
        *,
        check_s: float = _CHECK_S,
        retry_s: float = _RETRY_S,
        clock: Callable[[], float] = time.time,
        renew_fn: Callable[[Config], object] = renew,
    ) -> None:
        self.cfg = cfg
        self.files = KeyFiles.of(cfg)
        self.check_s = check_s
        self.retry_s = retry_s
        self.clock = clock
        self.renew_fn = renew_fn
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._throttle = Throttle(3600.0)

    def enabled(self) -> bool:
        """Whether the box can renew over the network: it was enrolled with a claim (it has an enrollment record)."""
        return self.files.record.is_file()

    def start(self) -> None:
        """Start the thread (nothing happens for a box enrolled by hand)."""
        if not self.enabled():
            event(
                log,
                logging.INFO,
                "certificate renewal off",
                reason=f"no enrollment record {self.files.record}: the box was enrolled by hand",
            )
            return
        self._thread = threading.Thread(target=self._run, name="edge-renewer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread (a renewal in progress finishes first; it is bounded by the client's timeouts)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    def step(self) -> float:
        """Check once, renew if due; returns the seconds until the next check."""
        try:
            cert = x509.load_pem_x509_certificate(self.files.cert.read_bytes())
        except (OSError, ValueError) as e:
            self._error("certificate unreadable", f"{self.files.cert}: {e}")
            return self.retry_s
        before, after = certificate_times(cert)
        now = self.clock()
        if not renewal_due(before, after, now):
            return self.check_s
        if now >= after:
            # An expired certificate cannot authenticate a renewal (TLS refuses it): only a new claim helps.
            self._error(
                "certificate expired",
                f"the certificate {self.files.cert} expired at {_iso(after)}: the box must be claimed again "
                "(edge enroll --claim CODE with a new code from the operator)",
            )
            return self.retry_s
        try:
            self.renew_fn(self.cfg)
        except EnrollUnavailableError as e:
            self.failures += 1
            self.last_error = str(e)
            if self._throttle.allow("unavailable") is not None:
                event(log, logging.WARNING, "certificate renewal failed, will retry", error=str(e), expires=_iso(after))
            return self.retry_s
        except (EnrollRefusedError, InputError, ConfigError) as e:
            self._error("certificate renewal refused", f"{e}; the box must be claimed again before {_iso(after)}")
            return self.retry_s
        self.renewals += 1
        self.last_error = None
        return self.check_s

    def _error(self, what: str, detail: str) -> None:
        self.failures += 1
        self.last_error = detail
        if self._throttle.allow(what) is not None:
            event(log, logging.ERROR, what, detail=detail)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.step()
            except Exception:  # the thread must outlive any single failure; it is logged with its traceback
                log.exception("certificate renewal failed unexpectedly")
                delay = self.retry_s
            self._stop.wait(delay)
