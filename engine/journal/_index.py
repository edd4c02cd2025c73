"""Frame indexes of sealed segments: what makes a full replay skip the frame walk.

``journal-<first seq>.kbx`` beside a sealed segment holds the kind byte and payload length of
every frame, bound to the segment by its length and the CRC32C of all its bytes. The appends
note each frame's kind and length as they frame it and the writer keeps the running CRC32C of
what it writes, so when a segment is sealed its index costs no walk: a background thread only
writes the file. (A segment sealed without one, by a crash in between, is walked once after
the next replay, every frame checked.) A replay then checks the segment with one CRC32C call
over the whole file and finds its ENTRY payloads from the index, without a call per frame. An
index is only ever a shortcut: missing, damaged, or not matching its segment's bytes, it is
ignored (with a warning) and the replay walks the frames, which also names the offset of any
damage; after a restart's replay, a missing or damaged one is rebuilt in the background.
"""

from __future__ import annotations

import struct
import sys
import time
from array import array
from pathlib import Path

from crc32c import crc32c

from .._replay import scan_groups
from ._format import GROUP_END, MAX_PAYLOAD, SEGMENT_HEADER, segment_name
from ._snapshot import replace_file

__all__ = ["INDEX_VERSION", "index_name", "index_from_notes", "build_index", "write_index", "load_index",
           "check_index", "IndexUnusable"]

INDEX_VERSION = 1
INDEX_MAGIC = b"KBNX"
# magic, version, header length, segment first seq, segment length, CRC32C of the segment's
# bytes, frame count, CRC32C of the body, CRC32C of the header before this field
INDEX_HEADER = struct.Struct("<4sHHQQIIII")
_SEGMENT_HEADER_SIZE = SEGMENT_HEADER.size
_STEP = 512  # frames per compiled step while indexing: the GIL comes back about every 0.2 ms


class IndexUnusable(Exception):
    """An index that cannot be used for its segment (the replay walks the frames instead)."""


def index_name(first_seq: int) -> str:
    return segment_name(first_seq)[:-4] + ".kbx"


def index_from_notes(first_seq: int, seg_len: int, seg_crc: int, kinds: bytes | bytearray, lengths: array,
                     header_size: int) -> bytes:
    """The index file of a segment from what the appends noted and the CRC32C of the bytes the
    writer wrote. Raises ``IndexUnusable`` if the notes do not add up to the segment's length."""
    if header_size + 17 * len(lengths) + sum(lengths) != seg_len or len(kinds) != len(lengths):
        raise IndexUnusable(f"segment {first_seq}: the notes do not add up to its {seg_len} bytes")
    return _index_file(first_seq, seg_len, seg_crc, bytes(kinds), lengths)


def _index_file(first_seq: int, seg_len: int, seg_crc: int, kinds: bytes, lengths: array) -> bytes:
    packed = array("I", lengths)
    if sys.byteorder == "big":
        packed.byteswap()
    body = kinds + packed.tobytes()
    head = INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, INDEX_HEADER.size, first_seq, seg_len, seg_crc, len(kinds),
                             crc32c(body), 0)
    return head[:-4] + struct.pack("<I", crc32c(head[:-4])) + body


def build_index(path: Path, first_seq: int, data) -> bytes:
    """The index file of the sealed segment ``data`` (its whole bytes), by walking it. Raises
    ``IndexUnusable`` if a frame is damaged: such a segment gets no index, and readers report
    the damage."""
    view = memoryview(data)
    kinds = bytearray()
    lengths: list[int] = []
    off, expect, end = _SEGMENT_HEADER_SIZE, first_seq, len(data)
    try:
        while off < end:
            off, expect, _, _, _, _, problem = scan_groups(data, view, off, end, expect, MAX_PAYLOAD, GROUP_END,
                                                           kinds, lengths, _STEP)
            if problem:
                raise IndexUnusable(f"{path}: {problem} at offset {off}")
            time.sleep(0)  # let other threads have the GIL between steps
        seg_crc = crc32c(view)
    finally:
        view.release()
    return _index_file(first_seq, end, seg_crc, bytes(kinds), array("I", lengths))


def write_index(directory: Path, first_seq: int, index: bytes, sync: bool) -> None:
    """Write an index whole or not at all (a temporary file, synced, renamed into place)."""
    replace_file(directory / index_name(first_seq), index, sync)


def load_index(directory: Path, first_seq: int, data) -> tuple[bytes, list[int]]:
    """The (kinds, payload lengths) of the segment ``data``'s frames, from its index, after
    checking the index, that the segment's bytes are the ones it was built from, and that its
    frames cover them end to end."""
    kinds, lengths, seg_crc = _read_index(directory, first_seq, len(data))
    if crc32c(data) != seg_crc:
        raise IndexUnusable(f"{directory / index_name(first_seq)}: the segment's bytes differ from the ones it was "
                            "built from")
    return kinds, lengths


def check_index(directory: Path, first_seq: int, seg_len: int, frames: int) -> None:
    """Check an index without reading its segment: whole (its checksums), of a segment of
    ``seg_len`` bytes holding ``frames`` frames (the next segment's first seq tells). Raises
    ``IndexUnusable`` (also for a missing index)."""
    kinds, _, _ = _read_index(directory, first_seq, seg_len)
    if len(kinds) != frames:
        raise IndexUnusable(f"{directory / index_name(first_seq)}: {len(kinds)} frames, the segment holds {frames}")


def _read_index(directory: Path, first_seq: int, seg_len: int) -> tuple[bytes, list[int], int]:
    """An index's kinds, payload lengths and segment CRC32C, checked against itself and against
    a segment of ``seg_len`` bytes."""
    path = directory / index_name(first_seq)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise IndexUnusable(f"{path.name}: no index") from None
    size = INDEX_HEADER.size
    if len(raw) < size:
        raise IndexUnusable(f"{path}: {len(raw)} bytes, shorter than its header")
    magic, version, hsize, seq, length, seg_crc, frames, body_crc, head_crc = INDEX_HEADER.unpack_from(raw)
    if magic != INDEX_MAGIC or head_crc != crc32c(raw[:size - 4]):
        raise IndexUnusable(f"{path}: not an index header (bad magic or checksum)")
    if version != INDEX_VERSION or hsize != size:
        raise IndexUnusable(f"{path}: index version {version}; this build reads {INDEX_VERSION}")
    body = memoryview(raw)[size:]
    if seq != first_seq or len(body) != 5 * frames or crc32c(body) != body_crc:
        raise IndexUnusable(f"{path}: damaged index")
    if seg_len != length:
        raise IndexUnusable(f"{path}: the segment's bytes differ from the ones it was built from "
                            f"({seg_len} bytes, not {length})")
    lengths = array("I")
    lengths.frombytes(body[frames:])
    if sys.byteorder == "big":
        lengths.byteswap()
    if _SEGMENT_HEADER_SIZE + 17 * frames + sum(lengths) != length:
        raise IndexUnusable(f"{path}: its frames do not cover the segment")
    return bytes(body[:frames]), lengths.tolist(), seg_crc
