"""The replay's inner loops: walking a segment's frames and running its entries.

Compiled with mypyc together with the engine (``setup.py``), so that a restart without a
snapshot runs at the engine's own pace: per frame, the walk costs a header unpack, a CRC32C
and a seq check, and per entry, the run costs a decode and a direct call into the compiled
``Engine.execute``. Plain Python where the extension is absent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from mmap import mmap
from typing import Any, Final

from crc32c import crc32c
from msgspec import ValidationError
from msgspec.structs import astuple

from ._engine import Engine

__all__ = ["scan_groups", "index_spans", "run_entries"]

# _format.FRAME and FRAME_SIZE (that module is not compiled; _log checks that they agree)
FRAME: Final = struct.Struct("<IIQB")  # crc32c, payload length, seq, kind
FRAME_SIZE: Final = 17
_unpack_frame = FRAME.unpack_from
KIND_MASK: Final = 0x7F


def scan_groups(data: mmap | bytes, view: memoryview, off: int, end: int, expect: int, max_payload: int,
                group_mark: int, kinds: bytearray, lengths: list[int],
                limit: int = 1 << 62) -> tuple[int, int, int, int, int, int, str]:
    """Walk and check frames (length, CRC32C, seq) up to the first bad one, noting each one's
    kind and payload length (``index_spans`` turns the notes into payload bounds): the recovery
    scan of the newest segment (the notes spare the replay a second walk), the replay of a
    segment without a usable index, and the indexing of a sealed segment found without its
    index (in steps of ``limit`` frames, since compiled code never gives the GIL back). Returns (offset
    reached, next expected seq, records seen, end of the last whole group, its last seq,
    offset of its last frame or -1, problem): the problem is "" at ``end`` or after ``limit``
    frames, else "cut" (a cut-off frame) or "checksum"; a seq out of order is "seq" (the
    caller raises for that one)."""
    records = 0
    group_end = off
    group_seq = expect - 1
    group_last = -1
    while off < end and records < limit:
        if end - off < FRAME_SIZE:
            return off, expect, records, group_end, group_seq, group_last, "cut"
        crc, length, seq, k = _unpack_frame(data, off)
        stop = off + FRAME_SIZE + length
        if length > max_payload or stop > end:
            return off, expect, records, group_end, group_seq, group_last, "cut"
        if crc32c(view[off + 4:stop]) != crc:
            return off, expect, records, group_end, group_seq, group_last, "checksum"
        if seq != expect:
            return off, expect, records, group_end, group_seq, group_last, "seq"
        expect += 1
        records += 1
        kinds.append(k)
        lengths.append(length)
        if k >= group_mark:
            group_end = stop
            group_seq = seq
            group_last = off
        off = stop
    return off, expect, records, group_end, group_seq, group_last, ""


def index_spans(kinds: bytes, lengths: list[int], off: int, start: int, kind: int, spans: list[int]) -> int:
    """The payload bounds of the frames of ``kind`` at or after offset ``start``, from a segment's
    index (frames laid end to end from ``off``); returns the offset after the last frame."""
    i = 0
    for length in lengths:
        stop = off + FRAME_SIZE + length
        if kinds[i] & KIND_MASK == kind and off >= start:
            spans.append(off + FRAME_SIZE)
            spans.append(stop)
        off = stop
        i += 1
    return off


def run_entries(engine: Engine, data: mmap | bytes, spans: list[int], decode: Callable[[Any], Any],
                fallback: Callable[[Any], Any], classes: dict[type, type], new_order: type) -> int:
    """Run the ENTRY payloads at ``spans`` through the engine; returns how many.

    ``decode`` gives an entry as a tuple (ts, member, session, throttled, command, reports)
    whose command is an unconstrained twin of its class (validated when it was first taken),
    and raises ``ValidationError`` for an entry naming a member or
    instrument it does not know, which ``fallback`` decodes instead. ``classes`` maps a twin
    back to the class the engine knows. ``new_order``, the twin of ``NewOrder`` that ``decode``
    gives (most of the traffic), goes to the engine as it is (a subclass of ``NewOrder``); the
    others are rebuilt as their own class.
    """
    for i in range(0, len(spans), 2):
        payload = data[spans[i]:spans[i + 1]]
        try:
            ts, member, session, throttled, command, _ = decode(payload)
        except ValidationError:
            ts, member, session, throttled, command, _ = fallback(payload)
        if type(command) is not new_order:
            command = classes[type(command)](*astuple(command))
        engine.execute(command, member, ts, session, throttled)
    return len(spans) // 2
