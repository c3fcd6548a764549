"""The fleet's claim codes: created by the operator, each redeemed once by one box key.

The rules (``decide``) are sans-IO; ``ClaimBook`` keeps the claims in ``<fleet dir>/enroll/claims.sqlite`` (SQLite:
one file beside the CA, with transactions, so two boxes redeeming one claim at once cannot both win).

A claim's life: ``open`` -> (approval ``manual``: ``pending`` -> ``approved``) -> ``used``, or ``revoked`` at any point
before ``used``. A claim is bound to the first box key (its did) that presents it, in the same transaction that
checks it: from then on only that key may complete or repeat the enrollment, so a box that lost power half-way
through enrolls again with the same code, and nobody else can. Only the digest of a secret is stored.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge.errors import ConfigError, InputError, TransportError
from edge.wire.onboard import ClaimCode, new_secret, secret_digest

__all__ = [
    "APPROVALS",
    "CLAIMS_FILE",
    "ClaimBook",
    "ClaimRefused",
    "ClaimRow",
    "ClaimState",
    "Verdict",
    "decide",
]

CLAIMS_FILE: Final = "claims.sqlite"
APPROVALS: Final = ("auto", "manual")
_BUSY_TIMEOUT_S: Final = 30.0


class ClaimState(enum.StrEnum):
    """Where a claim is in its life."""

    OPEN = "open"
    PENDING = "pending"
    APPROVED = "approved"
    USED = "used"
    REVOKED = "revoked"


class ClaimRefused(InputError):  # noqa: N818 -- a verdict on the box's input, named as the endpoint reports it
    """A box's claim cannot be redeemed.

    Attributes:
        reason: a short name the endpoint returns and counts (``unknown``, ``expired``, ``revoked``, ``used``,
            ``device_id``).
    """

    def __init__(self, reason: str, detail: str) -> None:
        """Create the refusal.

        Args:
            reason: the short name.
            detail: what is wrong and what to do, for the box owner.
        """
        self.reason = reason
        super().__init__(detail)


class Verdict(enum.StrEnum):
    """What the endpoint does with a request that passed the checks."""

    ISSUE = "issue"  # certify the key now
    WAIT = "wait"  # an operator must approve first: 202 and Retry-After


@dataclass(frozen=True, slots=True)
class ClaimRow:
    """A stored claim.

    Attributes:
        claim_id: its public name (``ClaimCode.claim_id``).
        device_id: the pinned device id, or None.
        approval: ``auto`` or ``manual``.
        state: see ``ClaimState``.
        created, expires: epoch seconds.
        did: the box key the claim is bound to, once one presented it.
        enrolled_id: the device id it enrolled, once used.
        used_at: when it was used.
        note: the operator's label.
    """

    claim_id: str
    device_id: str | None
    approval: str
    state: ClaimState
    created: float
    expires: float
    did: str | None = None
    enrolled_id: str | None = None
    used_at: float | None = None
    note: str = ""


def decide(row: ClaimRow | None, *, did: str, device_id: str, now: float) -> Verdict:
    """Whether a box key may redeem a claim now. Sans-IO.

    Args:
        row: the claim its secret names, or None for an unknown secret.
        did: the key in the box's CSR (proof of possession already checked).
        device_id: the id in the box's CSR.
        now: the endpoint's clock.

    Returns:
        ``ISSUE`` or ``WAIT``.

    Raises:
        ClaimRefused: the claim is unknown, revoked, expired, pinned to another id, or bound to another key.
    """
    if row is None:
        raise ClaimRefused("unknown", "no such claim code: check it was copied completely, or ask for a new one")
    if row.state is ClaimState.REVOKED:
        raise ClaimRefused("revoked", f"claim {row.claim_id} was revoked by the operator: ask for a new claim code")
    if row.did is not None and row.did != did:
        # Bound to another key: used (or being used) by another box. Said the same way whatever the state, so the
        # answer does not tell a thief how far the owner's box got.
        raise ClaimRefused("used", f"claim {row.claim_id} was used by another box: ask for a new claim code")
    if row.device_id is not None and row.device_id != device_id:
        raise ClaimRefused(
            "device_id",
            f"claim {row.claim_id} is for device {row.device_id!r}, the request is for {device_id!r}: enroll as "
            f"{row.device_id!r} (edge enroll reads it from the claim)",
        )
    if row.state is ClaimState.USED:
        return Verdict.ISSUE  # the same key again: a box finishing an enrollment a power cut interrupted
    if now > row.expires:
        raise ClaimRefused("expired", f"claim {row.claim_id} expired: ask the operator for a new claim code")
    if row.approval == "manual" and row.state is not ClaimState.APPROVED:
        return Verdict.WAIT
    return Verdict.ISSUE


_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS claims (
    claim_id TEXT PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    device_id TEXT,
    approval TEXT NOT NULL,
    state TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL,
    did TEXT,
    enrolled_id TEXT,
    used_at REAL,
    note TEXT NOT NULL DEFAULT ''
)
"""
_COLUMNS: Final = "claim_id, device_id, approval, state, created, expires, did, enrolled_id, used_at, note"


def _row(r: tuple[object, ...]) -> ClaimRow:
    claim_id, device_id, approval, state, created, expires, did, enrolled_id, used_at, note = r
    return ClaimRow(
        claim_id=str(claim_id),
        device_id=None if device_id is None else str(device_id),
        approval=str(approval),
        state=ClaimState(str(state)),
        created=float(created),  # type: ignore[arg-type]
        expires=float(expires),  # type: ignore[arg-type]
        did=None if did is None else str(did),
        enrolled_id=None if enrolled_id is None else str(enrolled_id),
        used_at=None if used_at is None else float(used_at),  # type: ignore[arg-type]
        note=str(note),
    )


class ClaimBook:
    """The claims of one fleet, in a SQLite file.

    Args:
        path: the database file (created with its directory).

    Raises:
        TransportError: the database cannot be opened.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            # isolation_level None: our own BEGIN IMMEDIATE, so a redeem's read and write are one write transaction.
            self._db = sqlite3.connect(
                self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise TransportError(f"cannot open the claims database {self.path}: {e}") from e

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise TransportError(f"claims database {self.path}: {e}") from e
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        else:
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                raise TransportError(f"claims database {self.path}: {e}") from e

    def create(
        self,
        *,
        host: str,
        port: int,
        ca_fingerprint: bytes,
        now: float,
        ttl_s: float,
        device_id: str | None = None,
        approval: str = "auto",
        note: str = "",
    ) -> tuple[ClaimCode, ClaimRow]:
        """Make a new one-time claim code.

        Args:
            host, port: the enrollment endpoint the box will call.
            ca_fingerprint: the fleet CA certificate's SHA-256.
            now: the creation time.
            ttl_s: how long the code can be redeemed.
            device_id: pin the code to this device id (None: the box chooses).
            approval: ``auto`` (enroll at once) or ``manual`` (wait for ``approve``).
            note: a label for ``claims list``.

        Returns:
            The code (its secret exists only here and in what the caller prints) and the stored row.

        Raises:
            ConfigError: an approval mode other than ``auto`` or ``manual``, or a ttl that is not positive.
            TransportError: the database failed.
        """
        if approval not in APPROVALS:
            raise ConfigError("--approval", approval, "auto or manual")
        if not ttl_s > 0:
            raise ConfigError("--expires", ttl_s, "a positive duration")
        while True:
            code = ClaimCode(
                host=host, port=port, secret=new_secret(), ca_fingerprint=ca_fingerprint, device_id=device_id
            )
            row = ClaimRow(
                claim_id=code.claim_id,
                device_id=device_id,
                approval=approval,
                state=ClaimState.OPEN,
                created=now,
                expires=now + ttl_s,
                note=note,
            )
            try:
                with self._write() as db:
                    db.execute(
                        "INSERT INTO claims (claim_id, digest, device_id, approval, state, created, expires, note)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        (
                            row.claim_id,
                            secret_digest(code.secret),
                            device_id,
                            approval,
                            row.state,
                            now,
                            row.expires,
                            note,
                        ),
                    )
            except sqlite3.IntegrityError:
                continue  # two codes share the first 40 bits of their digest: draw another secret
            return code, row

    def list(self) -> list[ClaimRow]:
        """Every claim, oldest first."""
        try:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM claims ORDER BY created, claim_id").fetchall()  # noqa: S608
        except sqlite3.Error as e:
            raise TransportError(f"claims database {self.path}: {e}") from e
        return [_row(r) for r in rows]

    def get(self, claim_id: str) -> ClaimRow | None:
        """The claim with this id, or None."""
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM claims WHERE claim_id = ?", (claim_id,)).fetchall()  # noqa: S608
        return _row(rows[0]) if rows else None

    def _transition(self, claim_id: str, allowed: tuple[ClaimState, ...], to: ClaimState, verb: str) -> ClaimRow:
        with self._write() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM claims WHERE claim_id = ?", (claim_id,)).fetchall()  # noqa: S608
            if not rows:
                raise ConfigError("claim", claim_id, "the id of a claim (see `edge fleet claims list`)")
            row = _row(rows[0])
            if row.state not in allowed:
                raise ConfigError(
                    "claim", claim_id, f"a claim that can be {verb}d: it is {row.state} (only {'/'.join(allowed)})"
                )
            db.execute("UPDATE claims SET state = ? WHERE claim_id = ?", (to, claim_id))
        got = self.get(claim_id)
        assert got is not None
        return got

    def revoke(self, claim_id: str) -> ClaimRow:
        """Revoke a claim that has not been used; a box holding it can no longer enroll with it.

        Raises:
            ConfigError: no such claim, or it was used already (revoke the device instead).
        """
        return self._transition(
            claim_id,
            (ClaimState.OPEN, ClaimState.PENDING, ClaimState.APPROVED, ClaimState.REVOKED),
            ClaimState.REVOKED,
            "revoke",
        )

    def approve(self, claim_id: str) -> ClaimRow:
        """Approve a claim of approval mode ``manual``: the box waiting on it enrolls at its next poll.

        Approving before a box asked is allowed too (the next box to present the code enrolls at once).

        Raises:
            ConfigError: no such claim, or it is not open or pending.
        """
        return self._transition(
            claim_id, (ClaimState.OPEN, ClaimState.PENDING, ClaimState.APPROVED), ClaimState.APPROVED, "approve"
        )

    def redeem(self, secret: bytes, *, did: str, device_id: str, now: float) -> tuple[Verdict, ClaimRow]:
        """Check a box's claim and bind it to the box's key, in one write transaction.

        Args:
            secret: the secret the box presented.
            did: the key of its CSR.
            device_id: the id of its CSR.
            now: the endpoint's clock.

        Returns:
            The verdict and the claim after the call (``ISSUE``: now bound to ``did`` and ``used``; ``WAIT``:
            ``pending`` on ``did``).

        Raises:
            ClaimRefused: see ``decide``.
            TransportError: the database failed.
        """
        with self._write() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM claims WHERE digest = ?",  # noqa: S608
                (secret_digest(secret),),
            ).fetchall()
            row = _row(rows[0]) if rows else None
            verdict = decide(row, did=did, device_id=device_id, now=now)
            assert row is not None
            if verdict is Verdict.WAIT:
                state = ClaimState.PENDING
                db.execute("UPDATE claims SET did = ?, state = ? WHERE claim_id = ?", (did, state, row.claim_id))
            else:
                state = ClaimState.USED
                db.execute(
                    "UPDATE claims SET did = ?, state = ?, enrolled_id = COALESCE(enrolled_id, ?),"
                    " used_at = COALESCE(used_at, ?) WHERE claim_id = ?",
                    (did, state, device_id, now, row.claim_id),
                )
        got = self.get(row.claim_id)
        assert got is not None
        return verdict, got

    def release(self, claim_id: str, did: str) -> None:
        """Undo a ``redeem`` whose enrollment the registry refused for a reason of the box's request (its id is
        taken): the claim is open again, so the owner can retry with another id."""
        with self._write() as db:
            db.execute(
                "UPDATE claims SET did = NULL, enrolled_id = NULL, used_at = NULL,"
                " state = CASE approval WHEN 'manual' THEN ? ELSE ? END"
                " WHERE claim_id = ? AND did = ? AND state = ?",
                (ClaimState.APPROVED, ClaimState.OPEN, claim_id, did, ClaimState.USED),
            )

    def close(self) -> None:
        """Close the database."""
        self._db.close()
