"""Ready-made fleet repositories for the OTA tests: publisher keys, digits releases of any version, golden files.

Everything here is real: Ed25519 keys, TUF metadata signed by them, ONNX files rewritten with the ``onnx`` package,
golden outputs computed by onnxruntime.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge._fs import atomic_write
from edge.fleet.models._tuf_keys import private_pem, public_pem
from edge.fleet.models.repository import FleetRepository
from edge.inference.model import Model
from edge.inference.preprocess import preprocess_image
from edge.sensing.synthetic import render_test_frames

ROOT = Path(__file__).resolve().parents[2]
DIGITS_INT8 = ROOT / "edge" / "models" / "digits-int8.onnx"
DIGITS_FP32 = ROOT / "edge" / "models" / "digits-fp32.onnx"
PUBLISHER = "acme"
# A fixed signing time, so metadata expiry in tests does not depend on the wall clock.
NOW = datetime.datetime(2026, 11, 22, 6, 30, tzinfo=datetime.UTC)


def make_publisher_key(dir: Path, name: str) -> tuple[Ed25519PrivateKey, Path]:
    """Generate a publisher key pair: writes ``dir/NAME.pem`` (0600) and ``dir/NAME.pub``.

    Returns:
        The private key and the path of the public key file.
    """
    dir.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    atomic_write(dir / f"{name}.pem", private_pem(key), mode=0o600)
    pub = dir / f"{name}.pub"
    atomic_write(pub, public_pem(key.public_key()))
    return key, pub


def digits_release_files(tmp: Path, version: str, *, source: Path = DIGITS_INT8, name: str = "digits") -> Path:
    """A copy of a bundled digits model whose ``edge.version`` (and ``edge.name``) metadata say ``version``.

    Args:
        tmp: where to write ``<name>-<version>-<source name>``.
        version: the release version.
        source: the model to copy (default the int8 digits model).
        name: the ``edge.name`` to write.

    Returns:
        The new file's path.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    proto = onnx.load(str(source))
    props = {p.key: p.value for p in proto.metadata_props}
    props["edge.version"] = version
    props["edge.name"] = name
    del proto.metadata_props[:]
    for k, v in props.items():
        proto.metadata_props.add(key=k, value=v)
    out = tmp / f"{name}-{version}-{source.name}"
    onnx.save(proto, str(out))
    return out


def make_golden(model: Path, out: Path, n: int = 8) -> Path:
    """Golden samples for ``model``: the first ``n`` held-out digit frames preprocessed as the pipeline does, and
    the model's raw outputs on them.

    Returns:
        ``out`` (an ``.npz`` with ``inputs`` and ``outputs``).
    """
    m = Model(model, warmup=0)
    kwargs = m.preprocess_kwargs()
    inputs = []
    outputs = []
    for frame, _label in render_test_frames("RGB888", count=n):
        tensor = preprocess_image(frame, pixel_format="RGB888", **kwargs)
        inputs.append(tensor[0])
        outputs.append(np.asarray(m.run(tensor), dtype=np.float32).reshape(-1))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as f:
        np.savez(f, inputs=np.stack(inputs), outputs=np.stack(outputs))
    return out


def ready_repository(
    fleet_dir: Path, *, now: datetime.datetime | None = None, versions: Sequence[str] = ("1.0.0",)
) -> tuple[FleetRepository, Ed25519PrivateKey]:
    """A repository with publisher ``acme`` (model ``digits``) and each version published with golden samples.

    Args:
        fleet_dir: the fleet directory (its ``work/`` holds the release files and the publisher's key).
        now: the signing time (default ``NOW``).
        versions: the digits versions to publish, in order.

    Returns:
        The repository and the publisher's private key.
    """
    now = now or NOW
    repo = FleetRepository.init(fleet_dir, now=now)
    work = fleet_dir / "work"
    key, _pub = make_publisher_key(work, PUBLISHER)
    repo.add_publisher(PUBLISHER, key.public_key(), ["digits"], now=now)
    for version in versions:
        model = digits_release_files(work, version)
        golden = make_golden(model, work / f"golden-{version}.npz")
        repo.publish(
            model, name="digits", version=version, publisher=PUBLISHER, publisher_key=key, now=now, golden=golden
        )
    return repo, key
