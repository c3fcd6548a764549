"""The OTA tests' environment (a served fleet repository and a box directory) and metadata crafting helpers.

A module of its own, not the conftest: test files import from it by name, and ``conftest`` is ambiguous when several
test directories are on ``sys.path``."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from repo_helpers import NOW
from securesystemslib.signer import CryptoSigner
from static_server import StaticServer
from tuf.api.metadata import Metadata, MetaFile, Snapshot, Timestamp

from edge.fleet.models._tuf_keys import sslib_key
from edge.fleet.models.repository import FleetRepository
from edge.ota.clock import TimeFloor
from edge.ota.fetch import ResumableFetcher
from edge.ota.trust import ISSUED_FIELD, TrustClient


@dataclass
class OtaEnv:
    """A served fleet repository (digits 1.0.0 by publisher acme) and a box directory, for TUF client tests.

    ``clock`` is the box's wall clock (seconds since the epoch); tests move it. The crafting helpers sign metadata
    with the fleet's keys the way an attacker holding them (or the repository itself) would, with the raw
    Metadata API.
    """

    repo: FleetRepository
    publisher_key: Any
    server: StaticServer
    box: Path
    clock: float = field(default_factory=lambda: NOW.timestamp() + 3600)

    def client(self, *, floor: TimeFloor | None = None, **kwargs: Any) -> TrustClient:
        """A TrustClient of the box (same metadata cache and floor file on every call, like a restarted service)."""
        kwargs.setdefault(
            "fetcher", ResumableFetcher(self.box / "downloads" / "partial", connect_timeout=5, read_timeout=5)
        )
        return TrustClient(
            repo_url=self.server.url,
            metadata_dir=self.box / "tuf",
            downloads_dir=self.box / "downloads",
            trusted_root=kwargs.pop("trusted_root", self.repo.root_bytes()),
            time_floor=floor if floor is not None else TimeFloor(self.box / "time-floor.json"),
            clock=lambda: self.clock,
            **kwargs,
        )

    def publisher_signer(self) -> CryptoSigner:
        """A signer with acme's (the publisher's) key."""
        return CryptoSigner(self.publisher_key, sslib_key(self.publisher_key.public_key()))

    @property
    def metadata_dir(self) -> Path:
        """The served metadata directory."""
        return self.repo.metadata_dir

    def served(self, filename: str) -> bytes:
        """The bytes of a served metadata file."""
        return (self.metadata_dir / filename).read_bytes()

    def commit(
        self,
        roles: Mapping[str, Metadata[Any]] | None = None,
        *,
        now: datetime.datetime | None = None,
        version_bump: int = 1,
    ) -> Metadata[Timestamp]:
        """Write ``roles`` (signed targets metadata by role name) and a new snapshot and timestamp listing them,
        signed with the fleet's online keys, as the repository would. Returns the new timestamp."""
        now = now or NOW
        roles = roles or {}
        for name, md in roles.items():
            (self.metadata_dir / f"{md.signed.version}.{name}.json").write_bytes(md.to_bytes())
        ts: Metadata[Timestamp] = Metadata.from_bytes(self.served("timestamp.json"))
        snap: Metadata[Snapshot] = Metadata.from_bytes(self.served(f"{ts.signed.snapshot_meta.version}.snapshot.json"))
        for name, md in roles.items():
            snap.signed.meta[f"{name}.json"] = MetaFile(md.signed.version)
        snap.signed.version += 1
        snap.signed.expires = now + datetime.timedelta(days=7)
        sign(snap, self.repo.role_keys("snapshot"))
        data = snap.to_bytes()
        (self.metadata_dir / f"{snap.signed.version}.snapshot.json").write_bytes(data)
        ts.signed.version += version_bump
        ts.signed.expires = now + datetime.timedelta(days=1)
        ts.signed.snapshot_meta = MetaFile(snap.signed.version, len(data), {"sha256": hashlib.sha256(data).hexdigest()})
        ts.signed.unrecognized_fields[ISSUED_FIELD] = now.strftime("%Y-%m-%dT%H:%M:%SZ")
        sign(ts, self.repo.role_keys("timestamp"))
        (self.metadata_dir / "timestamp.json").write_bytes(ts.to_bytes())
        return ts


def sign(md: Metadata[Any], signers: Sequence[Any]) -> Metadata[Any]:
    """Replace the signatures of ``md`` by those of ``signers``."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md
