"""Bounded readers of ``.npy`` and ``.npz`` files from outside the process (golden samples, frame files,
calibration sets).

``np.load`` trusts its input: it allocates the array an ``.npy`` header declares before reading a byte of it, a zip
member inflates to whatever its stream holds, and the archive's central directory is parsed whole. These readers
check every size the input declares against :class:`ArrayLimits` *before* anything is allocated from it:

1. the file itself (``max_file_bytes``), from its ``stat`` or length, before it is opened as a zip;
2. an archive's end-of-central-directory record: how many members it declares (``max_arrays``) and how large its
   directory is, before ``zipfile`` parses that directory;
3. each member's declared uncompressed size (``max_array_bytes``) and their sum (``max_total_bytes``), before any
   member is inflated (``zipfile`` never inflates past the declared size, so a member that lies about it ends short
   and fails its CRC);
4. each ``.npy`` header: its length (:data:`MAX_NPY_HEADER_BYTES`), then shape x itemsize (``max_array_bytes``, and
   exactly what the file or member holds after the header), before the array is allocated.

Arrays of Python objects are refused outright: their data is a pickle, and unpickling runs code. Every violation is
an :class:`~edge.errors.InputError` whose message names the file (or the caller's label for bytes), the declared size
and the limit.
"""

from __future__ import annotations

import io
import math
import os
import tokenize
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt

from edge.errors import InputError

__all__ = ["MAX_NPY_HEADER_BYTES", "ArrayLimits", "NpzArchive", "is_npy", "read_npy", "read_npz"]

# numpy's own default for ``max_header_size``: a header holds a dtype and a shape, a few hundred bytes in practice.
MAX_NPY_HEADER_BYTES: Final = 10_000
_NPY_MAGIC: Final = b"\x93NUMPY"
# A central directory entry is 46 bytes plus its name, extra field and comment; numpy writes a name like
# ``inputs.npy`` and a zip64 extra of 28 bytes. 1 KiB per declared member leaves room for any honest writer.
_MAX_DIRECTORY_BYTES_PER_MEMBER: Final = 1024
_EOCD: Final = b"PK\x05\x06"
_EOCD_LEN: Final = 22
_ZIP64_LOCATOR: Final = b"PK\x06\x07"
_ZIP64_LOCATOR_LEN: Final = 20
_ZIP64_EOCD: Final = b"PK\x06\x06"
_ZIP64_EOCD_LEN: Final = 56
_MAX_ZIP_COMMENT: Final = 0xFFFF
_CHUNK: Final = 1 << 20
_COMPRESSIONS: Final = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)  # what np.savez and np.savez_compressed write


@dataclass(frozen=True, slots=True)
class ArrayLimits:
    """Bounds on one ``.npy``/``.npz`` input, all in bytes except ``max_arrays``.

    Attributes:
        max_file_bytes: the file as stored (compressed, for an ``.npz``).
        max_array_bytes: one array as declared: an ``.npz`` member's uncompressed size, an ``.npy``'s data.
        max_total_bytes: every member of an ``.npz`` together, uncompressed.
        max_arrays: the members an ``.npz`` may declare.
    """

    max_file_bytes: int
    max_array_bytes: int
    max_total_bytes: int
    max_arrays: int = 16

    def __post_init__(self) -> None:
        if min(self.max_file_bytes, self.max_array_bytes, self.max_total_bytes, self.max_arrays) < 1:
            raise ValueError(f"array limits must be positive, got {self}")


def is_npy(path: Path) -> bool:
    """Whether ``path`` starts like an ``.npy`` file (its magic string), without reading further."""
    with path.open("rb") as f:
        return f.read(len(_NPY_MAGIC)) == _NPY_MAGIC


def read_npy(path: str | os.PathLike[str], limits: ArrayLimits) -> npt.NDArray[Any]:
    """Read one ``.npy`` file, checking its size and header before allocating the array.

    Args:
        path: the file.
        limits: ``max_file_bytes`` and ``max_array_bytes`` apply.

    Returns:
        The array (writable, never of Python objects).

    Raises:
        InputError: the file is larger than allowed, is not an ``.npy``, declares an array larger than allowed or
            than the file holds, or holds Python objects.
        OSError: the file cannot be opened or read (the caller says whose fault that is).
    """
    p = Path(path)
    with p.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limits.max_file_bytes:
            raise InputError(f"{p}: the file is {size} bytes, the limit is {limits.max_file_bytes}")
        return _read_array(f, size, str(p), limits.max_array_bytes)


def read_npz(
    source: str | os.PathLike[str] | bytes, limits: ArrayLimits, *, label: str | None = None
) -> dict[str, npt.NDArray[Any]]:
    """Read every array of an ``.npz`` (see :class:`NpzArchive` for the checks).

    Returns:
        Array name (the member name without ``.npy``) -> array.
    """
    with NpzArchive(source, limits, label=label) as z:
        return {name: z.read(name) for name in z.names}


class NpzArchive:
    """An ``.npz`` opened for bounded reading: every declared size is checked when it is opened, each header when
    its array is read.

    Args:
        source: the file's path, or its bytes.
        limits: the bounds to enforce.
        label: how messages name the input (default: the path, or ``"npz data"`` for bytes).

    Raises:
        InputError: the input is not a readable npz, or declares more members or bytes than ``limits`` allow.
        OSError: the file cannot be opened or read.
    """

    def __init__(
        self, source: str | os.PathLike[str] | bytes, limits: ArrayLimits, *, label: str | None = None
    ) -> None:
        self.limits = limits
        self._file: IO[bytes]
        if isinstance(source, bytes):
            self.label = label or "npz data"
            self._file = io.BytesIO(source)
            size = len(source)
        else:
            self.label = label or str(Path(source))
            self._file = Path(source).open("rb")  # noqa: SIM115 -- closed by close(), also on every error below
            size = os.fstat(self._file.fileno()).st_size
        try:
            if size > limits.max_file_bytes:
                raise InputError(f"{self.label}: the file is {size} bytes, the limit is {limits.max_file_bytes}")
            self._check_directory(size)
            try:
                self._zip = zipfile.ZipFile(self._file)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError, EOFError, OSError) as e:
                raise InputError(f"{self.label}: not a readable npz file ({e})") from e
            self._members = self._check_members()
        except BaseException:
            self._file.close()
            raise

    @property
    def names(self) -> tuple[str, ...]:
        """The array names, in archive order."""
        return tuple(self._members)

    def read(self, name: str) -> npt.NDArray[Any]:
        """Read the array ``name``, checking its header before allocating it.

        Raises:
            InputError: no such array; the header is malformed, declares more than ``max_array_bytes`` or than the
                member holds, or an array of Python objects; the member is corrupt (CRC, truncated).
        """
        info = self._members.get(name)
        if info is None:
            raise InputError(f"{self.label}: no array named {name!r}")
        what = f"{self.label}: array {name!r}"
        try:
            with self._zip.open(info) as member:
                # The header must account for every declared byte, so the array's last chunk ends the member and
                # zipfile checks its CRC there: a member whose stream disagrees with its headers is caught.
                return _read_array(member, info.file_size, what, self.limits.max_array_bytes)
        except InputError:
            raise
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, zlib.error) as e:
            raise InputError(f"{what}: the member is corrupt ({e})") from e
        except (RuntimeError, ValueError) as e:  # zipfile: an encrypted member, a local header offset out of range
            raise InputError(f"{what}: the member cannot be read ({e})") from e

    def close(self) -> None:
        """Close the underlying file."""
        zf = getattr(self, "_zip", None)
        if zf is not None:
            zf.close()
        self._file.close()

    def __enter__(self) -> NpzArchive:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    # -- checks made when the archive is opened ----------------------------------------------------------------

    def _check_directory(self, size: int) -> None:
        """Read the end-of-central-directory record (and its zip64 twin) as ``zipfile`` will, and bound what it
        declares before ``zipfile`` parses the directory into objects."""
        tail_len = min(size, _EOCD_LEN + _MAX_ZIP_COMMENT + _ZIP64_LOCATOR_LEN + _ZIP64_EOCD_LEN)
        self._file.seek(size - tail_len)
        tail = self._file.read(tail_len)
        at = tail.rfind(_EOCD)
        if at < 0 or len(tail) - at < _EOCD_LEN:
            raise InputError(f"{self.label}: not a readable npz file (no zip end-of-directory record)")
        members = int.from_bytes(tail[at + 10 : at + 12], "little")
        directory = int.from_bytes(tail[at + 12 : at + 16], "little")
        locator = at - _ZIP64_LOCATOR_LEN
        if locator >= 0 and tail[locator : locator + 4] == _ZIP64_LOCATOR:
            # zipfile takes the counts from the zip64 record right before the locator when there is one.
            record = locator - _ZIP64_EOCD_LEN
            if record < 0 or tail[record : record + 4] != _ZIP64_EOCD:
                raise InputError(f"{self.label}: not a readable npz file (corrupt zip64 end-of-directory record)")
            members = int.from_bytes(tail[record + 32 : record + 40], "little")
            directory = int.from_bytes(tail[record + 40 : record + 48], "little")
        limit = self.limits.max_arrays
        if members > limit:
            raise InputError(f"{self.label}: the archive declares {members} members, the limit is {limit}")
        if directory > limit * _MAX_DIRECTORY_BYTES_PER_MEMBER:
            raise InputError(
                f"{self.label}: the archive declares a {directory}-byte directory, "
                f"the limit is {limit * _MAX_DIRECTORY_BYTES_PER_MEMBER} ({limit} members)"
            )
        self._file.seek(0)

    def _check_members(self) -> dict[str, zipfile.ZipInfo]:
        infos = self._zip.infolist()
        if len(infos) > self.limits.max_arrays:
            raise InputError(
                f"{self.label}: the archive holds {len(infos)} members, the limit is {self.limits.max_arrays}"
            )
        members: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            if not info.filename.endswith(".npy"):
                raise InputError(f"{self.label}: member {info.filename[:80]!r} is not an .npy array")
            name = info.filename[: -len(".npy")]
            if name in members:
                raise InputError(f"{self.label}: array {name[:80]!r} appears twice")
            if info.compress_type not in _COMPRESSIONS:
                raise InputError(
                    f"{self.label}: array {name[:80]!r} uses zip compression method {info.compress_type}; "
                    "only stored and deflated members are read"
                )
            if info.file_size > self.limits.max_array_bytes:
                raise InputError(
                    f"{self.label}: array {name[:80]!r} declares {info.file_size} bytes uncompressed, "
                    f"the limit is {self.limits.max_array_bytes}"
                )
            members[name] = info
        total = sum(info.file_size for info in members.values())
        if total > self.limits.max_total_bytes:
            raise InputError(
                f"{self.label}: the arrays declare {total} bytes uncompressed in total, "
                f"the limit is {self.limits.max_total_bytes}"
            )
        return members


def _read_exact(f: IO[bytes], n: int, what: str, part: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise InputError(f"{what}: truncated {part} ({len(data)} of {n} bytes)")
    return data


def _read_array(f: IO[bytes], available: int, what: str, max_bytes: int) -> npt.NDArray[Any]:
    """Read one ``.npy`` stream of ``available`` bytes, checking the header before allocating the array."""
    magic = _read_exact(f, len(_NPY_MAGIC) + 2, what, "npy magic")
    if magic[: len(_NPY_MAGIC)] != _NPY_MAGIC:
        raise InputError(f"{what}: not an .npy array (bad magic)")
    version = (magic[-2], magic[-1])
    if version not in ((1, 0), (2, 0)):
        raise InputError(f"{what}: .npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    width = 2 if version == (1, 0) else 4
    length_field = _read_exact(f, width, what, "npy header length")
    header_len = int.from_bytes(length_field, "little")
    if header_len > MAX_NPY_HEADER_BYTES:
        raise InputError(f"{what}: the .npy header declares {header_len} bytes, the limit is {MAX_NPY_HEADER_BYTES}")
    header = _read_exact(f, header_len, what, "npy header")
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    try:
        # numpy's own parser, on a header already bounded and read: it sees nothing else of the stream.
        shape, fortran_order, dtype = reader(io.BytesIO(length_field + header), max_header_size=MAX_NPY_HEADER_BYTES)
    except (ValueError, SyntaxError, TypeError, RecursionError, tokenize.TokenError) as e:
        # What numpy's parser raises on a (bounded) header it cannot read: the header is malformed.
        raise InputError(f"{what}: malformed .npy header ({e})") from e
    if dtype.hasobject:
        raise InputError(f"{what}: the array holds Python objects (stored as a pickle); pickles are refused")
    if dtype.itemsize == 0:
        raise InputError(f"{what}: dtype {dtype} has zero-size elements")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > max_bytes:
        raise InputError(
            f"{what}: the .npy header declares shape {shape} of {dtype} = {nbytes} bytes, the limit is {max_bytes}"
        )
    held = available - len(magic) - width - header_len
    if nbytes != held:
        raise InputError(f"{what}: the .npy header declares {nbytes} bytes of data, the file holds {held}")
    buf = bytearray(nbytes)
    view = memoryview(buf)
    got = 0
    while got < nbytes:
        chunk = f.read(min(_CHUNK, nbytes - got))
        if not chunk:
            raise InputError(f"{what}: truncated data ({got} of {nbytes} bytes)")
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    flat = np.frombuffer(buf, dtype=dtype, count=count)
    if fortran_order:
        return flat.reshape(shape[::-1]).transpose()
    return flat.reshape(shape)
