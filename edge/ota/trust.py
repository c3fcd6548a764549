"""The box's TUF client: which models the fleet approved and their publishers signed, and verified downloads of them.

``TrustClient`` wraps ``tuf.ngclient.Updater``, which implements the TUF client workflow (root rotation, timestamp,
snapshot, targets and delegated publisher roles, with rollback, freeze, mix-and-match and fast-forward checks). What
this module adds:

- Trust anchor: the root provisioned at enrollment is passed as ``bootstrap`` on every refresh. ngclient then
  re-verifies the chain of newer roots it cached in ``metadata_dir/root_history`` from that anchor, so a rotated root
  survives restarts while a tampered cache cannot introduce a root the chain does not sign.
- Time: every expiry check uses ``time_floor.now(clock())`` (``max(clock, floor, build time)``), so a box whose clock
  reset to 1970 cannot be frozen on metadata that expired before a time it has already proven. After each successful
  refresh the signed ``x-edge-issued`` time of the timestamp is offered to the floor, which believes it only up to
  an hour past the box's own clock unless a fleet command agrees (``edge.ota.clock``): a timestamp key thief cannot
  make later, genuine metadata look expired.
- Provenance: :meth:`TrustClient.release` also checks that the manifest names the publisher role that signed it.
- Downloads go through :class:`~edge.ota.fetch.ResumableFetcher` (resume, limits while streaming); a file reaches
  ``dest`` only after ngclient checked its length and hashes, by an atomic rename.
- Errors: every TUF or transport failure becomes :class:`~edge.ota.errors.UpdateRejected` with one of the reasons
  ``expired``, ``rollback``, ``bad_signature``, ``hash_mismatch``, ``too_large``, ``network``, ``not_found``,
  ``bad_metadata`` (see :func:`rejection`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import urllib3
from tuf.api import exceptions
from tuf.api.metadata import TargetFile, Targets  # type: ignore[attr-defined] # the public path; tuf has no __all__
from tuf.ngclient.updater import Updater

from edge._fs import fsync_dir
from edge.log import redact

# TUF signs canonical JSON, which has no floats: the repository writes them as decimal strings and this reads them
# back. It belongs in edge.wire.manifest (the box should not import the gateway); the lead moves it there.
from edge.ota.clock import TimeFloor
from edge.ota.errors import UpdateRejected
from edge.ota.fetch import FetchStats, ResumableFetcher
from edge.wire.manifest import ModelManifest, target_path

__all__ = ["ISSUED_FIELD", "TrustClient", "rejection"]

log = logging.getLogger(__name__)

ISSUED_FIELD: Final = "x-edge-issued"

# BadVersionNumberError covers two different faults; these messages (tuf 7 trusted_metadata_set.py) are the
# rollback ones: a new timestamp/snapshot older than the trusted one, or a role's version in a new snapshot lower than
# in the trusted snapshot. The others ("Expected snapshot version N, got M", "Expected <role> vN, got vM") are a file
# that does not match the meta of the file that lists it: mix-and-match. tests/ota/test_attacks.py pins both.
_ROLLBACK_MESSAGES: Final = (
    re.compile(r"New timestamp version \d+ must be >= \d+"),
    re.compile(r"New snapshot version must be >= \d+"),
    re.compile(r"Expected \S+\.json version \d+, got \d+"),
)


def rejection(error: BaseException) -> UpdateRejected:
    """Translate a tuf or transport exception into :class:`UpdateRejected` with its reason.

    Args:
        error: what ngclient, the fetcher or urllib3 raised.

    Returns:
        The verdict: ``expired``, ``rollback``, ``bad_signature``, ``hash_mismatch``, ``too_large``, ``network`` or
        ``bad_metadata`` (any other repository error, with tuf's message saying which check failed).
    """
    # Redacted: the message may quote the repository URL, credentials included, and it travels in signed telemetry.
    msg = redact(str(error) or type(error).__name__)
    if isinstance(error, UpdateRejected):
        return error
    if isinstance(error, exceptions.ExpiredMetadataError):
        return UpdateRejected("expired", msg)
    if isinstance(error, exceptions.BadVersionNumberError):
        if any(p.search(msg) for p in _ROLLBACK_MESSAGES):
            return UpdateRejected("rollback", msg)
        return UpdateRejected("bad_metadata", f"inconsistent repository (mix-and-match?): {msg}")
    if isinstance(error, exceptions.UnsignedMetadataError):
        return UpdateRejected("bad_signature", msg)
    if isinstance(error, exceptions.LengthOrHashMismatchError):
        return UpdateRejected("hash_mismatch", msg)
    if isinstance(error, exceptions.DownloadLengthMismatchError):
        return UpdateRejected("too_large", msg)
    if isinstance(error, exceptions.DownloadError | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError):
        return UpdateRejected("network", msg)
    # Any other RepositoryError (a snapshot dropping a role, a wrong metadata type, unparsable JSON...): tuf's
    # message names the check.
    return UpdateRejected("bad_metadata", f"{type(error).__name__}: {msg}")


@contextlib.contextmanager
def _verdicts() -> Iterator[None]:
    try:
        yield
    except UpdateRejected:
        raise
    except (
        exceptions.RepositoryError,
        exceptions.DownloadError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    ) as e:
        raise rejection(e) from e


class TrustClient:
    """The box's view of the fleet's TUF repository.

    Args:
        repo_url: base URL of the served repository (``metadata/`` and ``targets/`` are below it).
        metadata_dir: ngclient's metadata cache (the box's TUF trust state; keep it on persistent storage).
        downloads_dir: where partial downloads live between attempts.
        trusted_root: the root.json bytes provisioned at enrollment (the trust anchor).
        time_floor: the box's proven time.
        clock: the wall clock (seconds since the epoch).
        max_target_bytes: targets larger than this are refused before any byte is downloaded.
        fetcher: the fetcher to use; a :class:`ResumableFetcher` over ``downloads_dir`` by default.
    """

    def __init__(
        self,
        *,
        repo_url: str,
        metadata_dir: Path,
        downloads_dir: Path,
        trusted_root: bytes,
        time_floor: TimeFloor,
        clock: Callable[[], float] = time.time,
        max_target_bytes: int = 256 * 2**20,
        fetcher: ResumableFetcher | None = None,
    ) -> None:
        base = repo_url if repo_url.endswith("/") else repo_url + "/"
        self._metadata_url = base + "metadata/"
        self._targets_url = base + "targets/"
        self._metadata_dir = Path(metadata_dir)
        self._downloads_dir = Path(downloads_dir)
        self._trusted_root = trusted_root
        self._floor = time_floor
        self._clock = clock
        self._max_target_bytes = max_target_bytes
        self._fetcher = fetcher if fetcher is not None else ResumableFetcher(self._downloads_dir / "partial")
        self._updater: Updater | None = None

    @property
    def stats(self) -> FetchStats:
        """What the fetcher moved over the network."""
        return self._fetcher.stats

    def effective_time(self) -> float:
        """The time every expiry check uses: ``max(clock(), time floor, build time)``."""
        return self._floor.now(self._clock())

    def refresh(self) -> None:
        """Load and verify the newest top-level metadata (root chain, timestamp, snapshot, targets).

        On success the timestamp's signed ``x-edge-issued`` is offered to the time floor (``TimeFloor.prove``).

        Raises:
            UpdateRejected: the metadata failed a check or could not be downloaded (see :func:`rejection`).
            OSError: the metadata cache cannot be written (a local fault).
        """
        self._updater = None
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        with _verdicts():
            updater = Updater(
                str(self._metadata_dir),
                self._metadata_url,
                target_base_url=self._targets_url,
                fetcher=self._fetcher,
                bootstrap=self._trusted_root,
            )
            _set_reference_time(updater, self.effective_time())
            updater.refresh()
        self._updater = updater
        self._prove_issued_time(updater)

    def _current(self) -> Updater:
        if self._updater is None:
            self.refresh()
        assert self._updater is not None
        return self._updater

    def _targetinfo(self, path: str) -> TargetFile:
        updater = self._current()
        with _verdicts():
            info = updater.get_targetinfo(path)
        if info is None:
            raise UpdateRejected("not_found", f"no approved publisher signed target {path!r:.200}")
        return info

    def release(self, name: str, version: str) -> ModelManifest:
        """The signed manifest of ``name@version``, from the latest refresh (refreshes first if there was none).

        Raises:
            UpdateRejected: ``not_found`` when no delegated publisher signed it (or signed it outside its
                delegation), ``bad_metadata`` when the manifest names another publisher than the role that signed
                it, or any refresh verdict.
            ManifestError: the custom metadata is not a valid manifest.
        """
        path = target_path(name, version)
        info = self._targetinfo(path)
        sha256 = info.hashes.get("sha256")
        if sha256 is None:
            raise UpdateRejected("bad_metadata", f"target {path} has no sha256 hash")
        manifest = ModelManifest.from_custom(path, info.custom, length=info.length, sha256=sha256)
        signer = self._signing_role(path, info)
        if signer != manifest.publisher:
            raise UpdateRejected(
                "bad_metadata",
                f"{manifest.model_id} claims publisher {manifest.publisher!r} but role {signer!r} signed it",
            )
        return manifest

    def _signing_role(self, path: str, info: TargetFile) -> str | None:
        """The delegated role whose verified metadata listed ``info`` (ngclient does not return it)."""
        trusted = self._current()._trusted_set  # read-only look at verified metadata
        top = trusted.targets
        if top.delegations is None or top.delegations.roles is None:
            return None
        for role_name in top.delegations.roles:
            signed = trusted.get(role_name)
            if (
                trusted.contains(role_name, Targets.type)
                and isinstance(signed, Targets)
                and signed.targets.get(path) == info
            ):
                return role_name
        return None

    def fetch(
        self,
        target_path: str,
        dest: Path,
        *,
        expected_sha256: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path:
        """Download a target listed by the latest refresh, verify it, and atomically place it at ``dest``.

        Args:
            target_path: the TUF target path, e.g. ``digits/2.0.0/model.onnx``.
            dest: the final file; its directory must exist. Nothing is written there unless every check passed.
            expected_sha256: the SHA-256 the manifest promised for this file (companions); must match TUF's.
            progress: called with (received bytes, total bytes) while downloading.

        Returns:
            ``dest``.

        Raises:
            UpdateRejected: ``not_found``, ``too_large`` (over ``max_target_bytes`` or more bytes than signed),
                ``hash_mismatch``, ``network`` (the partial download is kept and resumed by the next call), or
                any refresh verdict.
        """
        info = self._targetinfo(target_path)
        if info.length > self._max_target_bytes:
            raise UpdateRejected(
                "too_large", f"{target_path} is {info.length} bytes, the box accepts at most {self._max_target_bytes}"
            )
        signed_sha = info.hashes.get("sha256")
        if expected_sha256 is not None and (signed_sha is None or signed_sha.lower() != expected_sha256.lower()):
            raise UpdateRejected(
                "hash_mismatch", f"{target_path}: TUF says sha256 {signed_sha}, the manifest {expected_sha256}"
            )
        dest = Path(dest)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with _verdicts(), self._fetcher.reporting(progress):
                self._current().download_target(info, filepath=tmp_name)
            with tmp.open("rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(dest.parent)
        return dest

    def _prove_issued_time(self, updater: Updater) -> None:
        timestamp = updater._trusted_set.timestamp  # the timestamp ngclient just verified
        raw = timestamp.unrecognized_fields.get(ISSUED_FIELD)
        if raw is None:
            log.warning("timestamp v%d has no %s: the time floor is not raised", timestamp.version, ISSUED_FIELD)
            return
        try:
            issued = dt.datetime.fromisoformat(str(raw))
            if issued.tzinfo is None:
                raise ValueError("no time zone")
        except ValueError as e:
            log.warning("timestamp v%d has a malformed %s %r: %s", timestamp.version, ISSUED_FIELD, raw, e)
            return
        by = f"tuf timestamp v{timestamp.version}"
        if self._floor.prove(issued.timestamp(), by, kind="tuf", clock=self._clock()):
            raised = dt.datetime.fromtimestamp(self._floor.floor(), dt.UTC).isoformat()
            log.info("time floor raised to %s by timestamp v%d (signed %s)", raised, timestamp.version, raw)


def _set_reference_time(updater: Updater, effective: float) -> None:
    """Make ngclient check expiry against ``effective`` instead of the wall clock.

    ngclient reads ``datetime.now()`` once, into ``TrustedMetadataSet.reference_time``, when the Updater is created,
    and compares every expiry with it. Nothing public sets it, so we overwrite that attribute before ``refresh()``.
    If tuf ever renames it, assigning would silently create an unused attribute and disable the time floor: refuse
    to run instead (tests/ota/test_trust.py pins this).
    """
    trusted = updater._trusted_set
    if not isinstance(getattr(trusted, "reference_time", None), dt.datetime):
        raise RuntimeError("tuf's TrustedMetadataSet has no reference_time: the time floor cannot be applied")
    trusted.reference_time = dt.datetime.fromtimestamp(effective, dt.UTC)
