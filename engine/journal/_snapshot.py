"""Snapshot files: the engine's state at a journal seq, checksummed, written atomically.

``snapshot-<seq>.kbs`` = a 32-byte header (magic ``KBNS``, version, seq, payload length,
CRC32C of the payload, CRC32C of the header) and a msgpack ``SnapshotBody``. A file is written
under a temporary name, synced, renamed into place and the directory synced, so a snapshot
file is either whole or absent; a damaged one is skipped (and logged) in favour of an older one.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

import msgspec
from crc32c import crc32c

__all__ = ["SnapshotBody", "write_snapshot", "read_snapshot", "list_snapshots", "snapshot_name", "prune_snapshots"]

log = logging.getLogger("kaboni.journal")

SNAPSHOT_MAGIC = b"KBNS"
SNAPSHOT_FORMAT = 1
_HEADER = struct.Struct("<4sHHQQII")  # magic, format, reserved, seq, length, payload crc, header crc


class SnapshotBody(msgspec.Struct, array_like=True, gc=False):
    """What a restart needs besides the records after ``seq``."""

    seq: int  # journal seq of the last record the state includes (an ENTRY: a group end)
    position: int  # position of that record in the journal
    trading_day: str
    engine: bytes  # Engine.snapshot()
    index_step: int
    # member -> (report seqs, entry positions) as little-endian int64 and uint64 arrays: the
    # sparse per-member report index (see Ledger.reports)
    index: dict[str, tuple[bytes, bytes]]
    # CRC32C of the payload of the ENTRY at ``seq``: ties the snapshot to this journal, not just
    # to a seq and a position another journal's copy can have too (-1: written before it was
    # kept; not checked)
    entry_crc: int = -1


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(SnapshotBody).decode


def snapshot_name(seq: int) -> str:
    return f"snapshot-{seq:020d}.kbs"


def list_snapshots(directory: str | Path) -> list[int]:
    """Seqs of the snapshot files in ``directory``, newest first."""
    seqs = []
    for name in os.listdir(directory):
        if name.startswith("snapshot-") and name.endswith(".kbs") and name[9:-4].isdigit():
            seqs.append(int(name[9:-4]))
    return sorted(seqs, reverse=True)


def write_snapshot(directory: str | Path, body: SnapshotBody, sync: bool = True) -> Path:
    directory = Path(directory)
    payload = _encode(body)
    head = _HEADER.pack(SNAPSHOT_MAGIC, SNAPSHOT_FORMAT, 0, body.seq, len(payload), crc32c(payload), 0)
    head = head[:-4] + struct.pack("<I", crc32c(head[:-4]))
    final = directory / snapshot_name(body.seq)
    replace_file(final, head + payload, sync)
    return final


def replace_file(path: Path, data: bytes, sync: bool) -> None:
    """Write ``path`` whole or not at all: a temporary file beside it, synced (if ``sync``),
    renamed over it, and the directory synced."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_snapshot(path: str | Path) -> SnapshotBody | None:
    """The snapshot's body, or None (logged) if the file is damaged."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        log.warning("%s: unreadable snapshot skipped: %s", path, exc)
        return None
    if len(data) < _HEADER.size:
        log.warning("%s: snapshot shorter than its header; skipped", path)
        return None
    magic, version, _, seq, length, crc, head_crc = _HEADER.unpack_from(data)
    if magic != SNAPSHOT_MAGIC or head_crc != crc32c(data[:_HEADER.size - 4]):
        log.warning("%s: bad snapshot header; skipped", path)
        return None
    if version != SNAPSHOT_FORMAT:
        log.warning("%s: snapshot format %d is not %d; skipped", path, version, SNAPSHOT_FORMAT)
        return None
    payload = memoryview(data)[_HEADER.size:]
    if len(payload) != length or crc32c(payload) != crc:
        log.warning("%s: snapshot checksum mismatch; skipped", path)
        return None
    try:
        body = _decode(payload)
    except msgspec.DecodeError as exc:
        log.warning("%s: snapshot does not decode (%s); skipped", path, exc)
        return None
    if body.seq != seq:
        log.warning("%s: snapshot seq %d differs from its header's %d; skipped", path, body.seq, seq)
        return None
    return body


def prune_snapshots(directory: str | Path, keep: int = 2) -> None:
    """Remove all but the ``keep`` newest snapshots (and stale temporary files)."""
    directory = Path(directory)
    for seq in list_snapshots(directory)[keep:]:
        try:
            (directory / snapshot_name(seq)).unlink()
        except FileNotFoundError:
            pass
    for name in os.listdir(directory):
        if name.startswith("snapshot-") and name.endswith(".tmp"):
            try:
                (directory / name).unlink()
            except FileNotFoundError:
                pass
