"""edge.arrays: bounded .npy/.npz readers. Each attack is refused from what the file declares, before anything of the
declared size is allocated or inflated (checked with tracemalloc), with an InputError naming the file, the size and
the limit."""

from __future__ import annotations

import contextlib
import io
import random
import struct
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hostile_files import MAX_PEAK, MiB, TiB, bomb, npy_header, npz_bytes, sparse_file, traced_peak, zip_of

from edge.arrays import MAX_NPY_HEADER_BYTES, ArrayLimits, NpzArchive, read_npy, read_npz
from edge.errors import InputError

LIMITS = ArrayLimits(max_file_bytes=8 * MiB, max_array_bytes=4 * MiB, max_total_bytes=6 * MiB, max_arrays=4)


# -- what honest files do -------------------------------------------------------------------------------------------


def test_arrays_as_numpy_writes_them_round_trip(tmp_path: Path) -> None:
    arrays: dict[str, Any] = {
        "ints": np.arange(12).reshape(3, 4),
        "fortran": np.asfortranarray(np.arange(6.0).reshape(2, 3)),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.float32(3.5),
        "text": np.array(["ab", "c"]),
    }
    got = read_npz(npz_bytes(**arrays), ArrayLimits(MiB, MiB, MiB, max_arrays=8))
    assert set(got) == set(arrays)
    for name, want in arrays.items():
        assert got[name].dtype == np.asarray(want).dtype and np.array_equal(got[name], want)
        assert got[name].flags.writeable
    np.save(tmp_path / "x.npy", np.eye(3, dtype=np.float32))
    assert np.array_equal(read_npy(tmp_path / "x.npy", LIMITS), np.eye(3))
    compressed = io.BytesIO()
    np.savez_compressed(compressed, a=np.arange(100_000))
    assert read_npz(compressed.getvalue(), LIMITS)["a"][-1] == 99_999


# -- attacks --------------------------------------------------------------------------------------------------------


def test_zip_bomb_is_refused_from_its_declared_size_without_inflating() -> None:
    data = bomb(256 * MiB)
    assert len(data) < MiB  # the bomb: a quarter of a GiB in well under a MiB
    with (
        traced_peak() as peak,
        pytest.raises(InputError, match=r"npz data: array 'inputs' declares \d+ bytes uncompressed, the limit is"),
    ):
        read_npz(data, LIMITS)
    assert peak[0] < MAX_PEAK


def test_members_that_are_each_small_but_too_many_bytes_together_are_refused() -> None:
    each = np.zeros(int(3.5 * MiB), np.uint8)
    with pytest.raises(InputError, match=r"declare \d+ bytes uncompressed in total, the limit is 6291456"):
        read_npz(npz_bytes(a=each, b=each), LIMITS)


def test_member_that_understates_its_size_is_inflated_no_further_than_declared() -> None:
    # A 32 MiB stream whose zip headers claim 200 bytes: zipfile stops at the claim and the CRC check catches it.
    body = npy_header((64,), "|u1") + bytes(32 * MiB)
    data = bytearray(zip_of({"a.npy": body}, zipfile.ZIP_DEFLATED))
    claimed = len(npy_header((64,), "|u1")) + 64
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 22 : local + 26] = struct.pack("<I", claimed)
    data[central + 24 : central + 28] = struct.pack("<I", claimed)
    with traced_peak() as peak, pytest.raises(InputError, match="array 'a': the member is corrupt"):
        read_npz(bytes(data), LIMITS)
    assert peak[0] < MAX_PEAK


def test_npy_header_declaring_a_terabyte_array_is_refused_unallocated(tmp_path: Path) -> None:
    path = tmp_path / "frame.npy"
    path.write_bytes(npy_header((TiB // 8,)) + bytes(64))
    declared = (
        rf"{path}: the .npy header declares shape \(137438953472,\) of float64 = {TiB} bytes, the limit is 4194304"
    )
    with traced_peak() as peak, pytest.raises(InputError, match=declared):
        read_npy(path, LIMITS)
    assert peak[0] < MAX_PEAK
    member = zip_of({"inputs.npy": npy_header((1024, 1024, 1024, 128))})
    with (
        traced_peak() as peak,
        pytest.raises(InputError, match=rf"array 'inputs': the .npy header declares .* = {TiB} bytes"),
    ):
        read_npz(member, LIMITS)
    assert peak[0] < MAX_PEAK


def test_npy_header_larger_than_the_data_it_holds_is_refused(tmp_path: Path) -> None:
    # Within the limit, but more than the file holds: never trusted to allocate and then "fill".
    path = tmp_path / "short.npy"
    path.write_bytes(npy_header((MiB // 8,)) + bytes(16))
    with pytest.raises(InputError, match=r"declares 1048576 bytes of data, the file holds 16"):
        read_npy(path, LIMITS)


def test_npy_header_length_is_bounded_before_the_header_is_read(tmp_path: Path) -> None:
    path = tmp_path / "long-header.npy"
    path.write_bytes(b"\x93NUMPY\x02\x00" + (3 * 2**30).to_bytes(4, "little") + b"{" * 64)
    with pytest.raises(InputError, match=rf"header declares {3 * 2**30} bytes, the limit is {MAX_NPY_HEADER_BYTES}"):
        read_npy(path, LIMITS)


def test_pickled_object_arrays_are_refused(tmp_path: Path) -> None:
    data = npz_bytes(inputs=np.array([{"run": "code"}], dtype=object))
    with pytest.raises(InputError, match=r"Python objects .* pickles are refused"):
        read_npz(data, LIMITS)
    np.save(tmp_path / "o.npy", np.array([1, "x", None], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="pickles are refused"):
        read_npy(tmp_path / "o.npy", LIMITS)
    structured = np.zeros(2, dtype=[("a", "<i4"), ("b", "O")])
    with pytest.raises(InputError, match="pickles are refused"):
        read_npz(npz_bytes(s=structured), LIMITS)


def test_file_larger_than_allowed_is_refused_before_it_is_opened_as_a_zip(tmp_path: Path) -> None:
    path = sparse_file(tmp_path / "big.npz", LIMITS.max_file_bytes + 1)
    with pytest.raises(InputError, match=rf"{path}: the file is {LIMITS.max_file_bytes + 1} bytes, the limit is"):
        NpzArchive(path, LIMITS)


def test_too_many_members_are_refused_from_the_end_record() -> None:
    data = zip_of({f"a{i}.npy": b"" for i in range(LIMITS.max_arrays + 1)})
    with pytest.raises(InputError, match=r"declares 5 members, the limit is 4"):
        read_npz(data, LIMITS)


def test_zip64_end_record_declaring_a_billion_members_is_refused() -> None:
    plain = zip_of({"a.npy": npy_header((1,)) + bytes(8)})
    eocd = plain[-22:]
    record = b"PK\x06\x06" + struct.pack("<QHHIIQQQQ", 44, 45, 45, 0, 0, 10**9, 10**9, 46 * 10**9, 0)
    locator = b"PK\x06\x07" + struct.pack("<IQI", 0, 0, 1)
    with pytest.raises(InputError, match=r"declares 1000000000 members, the limit is 4"):
        read_npz(plain[:-22] + record + locator + eocd, LIMITS)


def test_a_directory_larger_than_its_members_need_is_refused() -> None:
    plain = bytearray(zip_of({"a.npy": npy_header((1,)) + bytes(8)}))
    plain[-22 + 12 : -22 + 16] = struct.pack("<I", 2**31)
    with pytest.raises(InputError, match=r"declares a 2147483648-byte directory, the limit is 4096"):
        read_npz(bytes(plain), LIMITS)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"not a zip at all", "not a readable npz"),
        (zip_of({"readme.txt": b"hi"}), "'readme.txt' is not an .npy array"),
        (zip_of({"a.npy": b"\x93NUMPY\x03\x00"}), "version 3.0 is not supported"),
        (zip_of({"a.npy": b"PK not npy"}), "not an .npy array"),
        (zip_of({"a.npy": npy_header((2,))[:-3]}), "truncated"),
        (zip_of({"a.npy": npy_header((2,), "<f8").replace(b"<f8", b"<zz") + bytes(16)}), "malformed .npy header"),
        (zip_of({"a.npy": npy_header((2,), "V0")}), "zero-size elements"),
        (zip_of({"a.npy": npy_header((2,), "|u1") + b"\0\0\0"}), "declares 2 bytes of data, the file holds 3"),
    ],
    ids=["not-zip", "not-npy-member", "npy-v3", "bad-magic", "truncated-header", "bad-dtype", "zero-size", "trailing"],
)
def test_malformed_archives_are_input_errors(data: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        read_npz(data, LIMITS)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        ArrayLimits(max_file_bytes=0, max_array_bytes=1, max_total_bytes=1)


def test_corrupted_archives_only_ever_raise_input_error() -> None:
    # Random byte flips and truncations of real archives reach zipfile, zlib and numpy's header parser: whatever
    # they raise must come out as an InputError (found this way: zlib.error, TokenError, encrypted-member errors).
    rng = random.Random(11)
    bases = [npz_bytes(a=np.arange(50, dtype=np.int16).reshape(5, 10), s=np.array(["x", "yy"]))]
    compressed = io.BytesIO()
    np.savez_compressed(compressed, a=np.arange(500), b=np.eye(4))
    bases.append(compressed.getvalue())
    for base in bases:
        for _ in range(1500):
            data = bytearray(base)
            for _ in range(rng.randint(1, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            if rng.random() < 0.1:
                data = data[: rng.randrange(len(data))]
            with contextlib.suppress(InputError):
                read_npz(bytes(data), LIMITS)
