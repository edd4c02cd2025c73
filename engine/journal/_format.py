"""The journal's on-disk format: segment headers, record frames, record kinds and payloads.

Version 1 (see ``docs/journal.md``). A segment file starts with a 24-byte header and holds
whole frames; a frame is ``crc32c u32 | length u32 | seq u64 | kind u8 | payload`` (little
endian), the CRC covering everything after itself. The high bit of ``kind`` marks the last
record of a group: recovery keeps only whole groups.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgspec

from .._messages import Command

__all__ = [
    "FORMAT_VERSION", "SEGMENT_MAGIC", "SEGMENT_HEADER", "FRAME", "FRAME_SIZE", "GROUP_END",
    "KIND_MASK", "MAX_PAYLOAD", "KIND_START", "KIND_FILL", "KIND_ENTRY", "KIND_REPORTS", "KIND_NAMES",
    "Record", "StartRecord", "FillRecord", "EntryRecord", "segment_name", "parse_segment_name",
    "pack_position", "unpack_position",
]

FORMAT_VERSION = 1
SEGMENT_MAGIC = b"KBNJ"
# magic, format version, header length, first seq of the segment, crc32c of the bytes before it
SEGMENT_HEADER = struct.Struct("<4sHHQI4x")
FRAME = struct.Struct("<IIQB")  # crc32c, payload length, seq, kind (| GROUP_END)
FRAME_SIZE = FRAME.size  # 17
GROUP_END = 0x80
KIND_MASK = 0x7F
MAX_PAYLOAD = 64 << 20  # a sanity bound used by recovery to reject garbage lengths

# Record kinds of the settlement journal (the generic log does not interpret them).
KIND_START = 1  # first record of a journal: format, first trading day, config digest
KIND_FILL = 2  # one settlement record per fill, usable without the engine
KIND_ENTRY = 3  # one journaled command with its time, origin and member reports
# more of a command's reports, before its ENTRY in the same group, when it has so many that
# one record would pass MAX_PAYLOAD (an end of day expiring a million DAY orders)
KIND_REPORTS = 4
KIND_NAMES = {KIND_START: "START", KIND_FILL: "FILL", KIND_ENTRY: "ENTRY", KIND_REPORTS: "REPORTS"}


class Record(NamedTuple):
    """One record as read back: ``position`` locates it for ``Journal.read_at``."""

    seq: int
    kind: int
    group_end: bool
    payload: bytes
    position: int


class StartRecord(msgspec.Struct, array_like=True, gc=False):
    format: int
    trading_day: str  # the first trading day: a full replay starts the engine on it
    config_sha256: str
    fee_account: str
    # the configuration's instrument symbols and member ids when the journal was created (None
    # in journals from before they were kept): a restart refuses a configuration without them
    instruments: list[str] | None = None
    members: list[str] | None = None


class FillRecord(msgspec.Struct, array_like=True, gc=False):
    """A delivery-versus-payment between two members: everything settlement needs."""

    trading_day: str
    trade_id: int
    instrument: str
    currency: str
    price: int
    qty: int
    buyer: str
    seller: str
    buyer_fee: int
    seller_fee: int
    buy_order_id: int
    sell_order_id: int
    aggressor: str  # "buy" or "sell": the taker's side
    ts: int


class EntryRecord(msgspec.Struct, array_like=True, gc=False):
    """One journaled command and the member reports it produced (their exact wire bytes)."""

    ts: int
    member: str
    session: int
    throttled: bool
    command: Command
    reports: list[tuple[str, int, bytes]]  # (member, report seq, msgpack body)


def segment_name(first_seq: int) -> str:
    return f"journal-{first_seq:020d}.kbj"


def parse_segment_name(name: str) -> int | None:
    if name.startswith("journal-") and name.endswith(".kbj") and len(name) == 32:
        digits = name[8:28]
        if digits.isdigit():
            return int(digits)
    return None


# A position is (segment first seq, byte offset) packed into one int for compact indexes.
def pack_position(segment: int, offset: int) -> int:
    return (segment << 32) | offset


def unpack_position(position: int) -> tuple[int, int]:
    return position >> 32, position & 0xFFFFFFFF
