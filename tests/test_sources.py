"""File sources (``npz``, ``directory``): hostile frame files are refused from what they declare, before anything of
that size is allocated. An ``npz`` source fails to open (InputError naming the file and the limit); a bad file of a
directory source is one bad input, counted and skipped."""

from __future__ import annotations

import numpy as np
import pytest
from hostile_files import MAX_PEAK, MiB, TiB, bomb, npy_header, sparse_file, traced_peak

from edge.config import SourceConfig
from edge.errors import InputError
from edge.sensing.frames import PixelFormat
from edge.sensing.sources import MAX_FRAME_FILE_BYTES, MAX_FRAMES_FILE_BYTES, DirectorySource, open_source


def npz_source(path) -> SourceConfig:
    return SourceConfig(kind="npz", path=path, pixel_format=PixelFormat.GRAY8)


def test_npz_source_reads_frames_and_labels(tmp_path) -> None:
    frames = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
    np.savez(tmp_path / "f.npz", frames=frames, labels=np.array([3, 7]))
    items = list(open_source(npz_source(tmp_path / "f.npz")).items())
    assert [i.label for i in items] == [3, 7] and np.array_equal(items[1].data, frames[1])


def test_npz_source_zip_bomb_is_refused_without_inflating(tmp_path) -> None:
    path = tmp_path / "frames.npz"
    path.write_bytes(bomb(MAX_FRAMES_FILE_BYTES + MiB, name="frames.npy"))  # 513 MiB of zeros in ~0.5 MiB
    declared = rf"{path}: array 'frames' declares \d+ bytes uncompressed, the limit is {MAX_FRAMES_FILE_BYTES}"
    with traced_peak() as peak, pytest.raises(InputError, match=declared):
        open_source(npz_source(path))
    assert peak[0] < MAX_PEAK


def test_npz_source_oversized_file_is_refused_before_it_is_opened(tmp_path) -> None:
    path = sparse_file(tmp_path / "frames.npz", MAX_FRAMES_FILE_BYTES + 1)
    with pytest.raises(InputError, match=rf"the file is {MAX_FRAMES_FILE_BYTES + 1} bytes, the limit is"):
        open_source(npz_source(path))


def test_npz_source_refuses_pickled_frames_and_labels(tmp_path) -> None:
    np.savez(tmp_path / "a.npz", frames=np.array([object()], dtype=object))
    with pytest.raises(InputError, match="pickles are refused"):
        open_source(npz_source(tmp_path / "a.npz"))
    np.savez(tmp_path / "b.npz", frames=np.zeros((1, 4, 4), np.uint8), labels=np.array(["x"]))
    with pytest.raises(InputError, match="'labels' must be one integer per frame"):
        open_source(npz_source(tmp_path / "b.npz"))


def test_directory_source_skips_and_counts_hostile_frames_without_allocating_them(tmp_path) -> None:
    good = np.full((4, 6), 9, np.uint8)
    np.save(tmp_path / "0-good.npy", good)
    (tmp_path / "1-terabyte.npy").write_bytes(npy_header((TiB,), "|u1"))
    np.save(tmp_path / "2-pickle.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    sparse_file(tmp_path / "3-huge.npy", MAX_FRAME_FILE_BYTES + 1, head=npy_header((MAX_FRAME_FILE_BYTES,), "|u1"))
    np.save(tmp_path / "4-good.npy", good)
    source = DirectorySource(tmp_path, PixelFormat.GRAY8)
    with traced_peak() as peak:
        frames = [item.data for item in source.items()]
    assert peak[0] < MAX_PEAK
    assert len(frames) == 2 and all(np.array_equal(f, good) for f in frames)
    assert source.rejected == 3
