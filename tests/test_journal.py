"""The generic log: framing, recovery (torn tails, corruption), readers, and group commit
durability shown with an instrumented file layer and a simulated power loss."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from engine.journal import (
    CorruptJournalError, FileOps, Journal, JournalError, JournalFailedError, JournalLockedError, list_segments,
    read_records, scan_journal,
)
from engine.journal._format import FRAME_SIZE, SEGMENT_HEADER, segment_name, unpack_position
from engine.journal._index import build_index, index_name


def payload(i: int) -> bytes:
    return (b"record-%d-" % i) * (1 + i % 7)


def fill(directory, n, **kw) -> Journal:
    j = Journal.open(directory, durability="none", **kw)
    for i in range(1, n + 1):
        assert j.append(1 + i % 3, payload(i)) == i
    return j


def test_append_read_back_and_reopen(tmp_path):
    durable = []
    j = Journal.open(tmp_path, on_durable=durable.append, segment_bytes=2048)
    for i in range(1, 301):
        j.append(1, payload(i))
    assert j.append_group([(2, b"a"), (3, b"b"), (2, b"c")]) == 303
    assert j.sync() == 303
    assert durable[-1] == 303 and durable == sorted(durable)
    assert [r.payload for r in j.records(1, 300)] == [payload(i) for i in range(1, 301)]
    assert [(r.seq, r.kind, r.group_end) for r in j.records(301)] == [(301, 2, False), (302, 3, False), (303, 2, True)]
    assert len(list_segments(tmp_path)) > 5  # it rolled
    assert j.stats.records == 303 and j.stats.pending == 0 and j.stats.bytes > 0
    j.close()
    j = Journal.open(tmp_path, segment_bytes=2048)
    assert j.recovered and j.last_seq == 303
    assert j.append(1, b"more") == 304
    j.close()
    assert [r.seq for r in read_records(tmp_path)] == list(range(1, 305))
    result = scan_journal(tmp_path)
    assert result.records == 304 and result.tail_bytes == 0


def test_read_at_position(tmp_path):
    j = fill(tmp_path, 50, segment_bytes=1024)
    positions = {}
    for i in range(51, 60):
        j.append(1, payload(i))
        positions[i] = j.last_position
    j.sync()
    for seq, pos in positions.items():
        assert next(iter(j.read_at(pos))).seq == seq
    j.close()


def test_follow_sees_records_as_they_become_durable(tmp_path):
    j = Journal.open(tmp_path, durability="none", segment_bytes=4096)

    def produce():
        for i in range(1, 2001):
            j.append(1, payload(i))
            if i % 100 == 0:
                time.sleep(0.005)

    t = threading.Thread(target=produce)
    t.start()
    seen = []
    for rec in j.follow(1, idle_timeout=1.0):
        seen.append(rec.seq)
        assert rec.payload == payload(rec.seq)
        if rec.seq == 2000:
            break
    t.join()
    assert seen == list(range(1, 2001))
    # from the middle, ending when the journal closes
    out = []
    done = threading.Event()

    def follower():
        for rec in j.follow(1990):
            out.append(rec.seq)
        done.set()

    ft = threading.Thread(target=follower)
    ft.start()
    j.append(1, b"last")
    time.sleep(0.1)
    j.close()
    assert done.wait(5)
    assert out == list(range(1990, 2002))


def _cut(path: Path, size: int) -> None:
    os.truncate(path, size)


def test_torn_tail_mid_record_is_truncated_and_logged(tmp_path, caplog):
    j = fill(tmp_path, 100)
    j.append(1, b"x" * 500)  # seq 101
    j.close()
    path = tmp_path / segment_name(1)
    size = path.stat().st_size
    _cut(path, size - 200)  # cut seq 101 in the middle of its payload
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        j = Journal.open(tmp_path)
    assert "torn tail" in caplog.text and str(path) in caplog.text
    assert j.last_seq == 100
    assert path.stat().st_size == size - 500 - FRAME_SIZE
    assert j.append(1, b"after") == 101
    j.close()
    assert [r.payload for r in read_records(tmp_path)][-1] == b"after"


@pytest.mark.parametrize("cut", [1, 5, FRAME_SIZE - 1, FRAME_SIZE + 3])
def test_torn_tail_inside_header(tmp_path, cut):
    j = fill(tmp_path, 20)
    j.close()
    path = tmp_path / segment_name(1)
    size = path.stat().st_size
    with open(path, "ab") as f:  # a partial next frame
        f.write(b"\x01" * cut)
    j = Journal.open(tmp_path)
    assert j.last_seq == 20 and path.stat().st_size == size
    j.close()


def test_incomplete_group_is_truncated_like_a_torn_tail(tmp_path):
    j = fill(tmp_path, 10)
    j.append_group([(2, b"fill-1"), (2, b"fill-2"), (3, b"entry")])  # seqs 11-13
    j.close()
    path = tmp_path / segment_name(1)
    size = path.stat().st_size
    _cut(path, size - (FRAME_SIZE + 5))  # drop the ENTRY: the FILLs have no group end
    assert scan_journal(tmp_path).last_seq == 10
    assert [r.seq for r in read_records(tmp_path)][-1] == 10
    j = Journal.open(tmp_path)
    assert j.last_seq == 10
    assert path.stat().st_size == size - 3 * FRAME_SIZE - len(b"fill-1fill-2entry")
    j.close()


def _offset_of(directory: Path, seq: int) -> tuple[Path, int]:
    for rec in read_records(directory):
        if rec.seq == seq:
            first, off = unpack_position(rec.position)
            return directory / segment_name(first), off
    raise AssertionError(seq)


@pytest.mark.parametrize("where", ["payload", "length", "crc"])
def test_flipped_byte_mid_file_names_file_and_offset(tmp_path, where):
    fill(tmp_path, 200).close()
    path, off = _offset_of(tmp_path, 100)
    flip = {"payload": off + FRAME_SIZE + 2, "length": off + 5, "crc": off}[where]
    data = bytearray(path.read_bytes())
    data[flip] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError) as info:
        Journal.open(tmp_path)
    assert info.value.path == str(path) and info.value.offset == off
    assert f"offset {off}" in str(info.value) and str(path) in str(info.value)
    with pytest.raises(CorruptJournalError) as info:
        scan_journal(tmp_path)
    assert info.value.offset == off
    with pytest.raises(CorruptJournalError):
        list(read_records(tmp_path))


def test_flipped_byte_in_an_older_segment_is_found_by_readers(tmp_path):
    fill(tmp_path, 400, segment_bytes=2048).close()
    first_segments = list_segments(tmp_path)
    assert len(first_segments) > 3
    path, off = _offset_of(tmp_path, 30)
    assert path.name == segment_name(first_segments[0])
    data = bytearray(path.read_bytes())
    data[off + FRAME_SIZE] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError) as info:
        scan_journal(tmp_path)
    assert (info.value.path, info.value.offset) == (str(path), off)
    assert (tmp_path / index_name(first_segments[0])).exists()
    with pytest.raises(CorruptJournalError) as info:
        list(read_records(tmp_path))  # the index no longer matches the bytes: the walk names the frame
    assert (info.value.path, info.value.offset) == (str(path), off)
    j = Journal.open(tmp_path, segment_bytes=2048)  # open checks the newest segment only
    with pytest.raises(CorruptJournalError) as info:
        list(j.records(1))
    assert (info.value.path, info.value.offset) == (str(path), off)
    j.close()


def test_payloads_are_the_records_of_one_kind_across_segments(tmp_path):
    fill(tmp_path, 300, segment_bytes=2048).close()
    j = Journal.open(tmp_path, segment_bytes=2048)  # the newest segment's scanned bytes are reused
    assert len(list_segments(tmp_path)) > 3
    start = next(iter(j.records(5, 5))).position
    for kind in (1, 2, 3):
        want = [r.payload for r in j.read_at(start, kind)]
        assert want and [bytes(p) for p in j.payloads(start, kind)] == want
    j.drop_scanned()
    assert [bytes(p) for p in j.payloads(start, 2)] == [r.payload for r in j.read_at(start, 2)]
    j.append(2, b"later")  # not durable yet in the writer's view until synced
    j.sync()
    assert bytes(list(j.payloads(start, 2))[-1]) == b"later"
    j.close()


@pytest.mark.parametrize("where", ["payload", "seq"])
def test_payloads_check_every_frame_of_an_older_segment(tmp_path, where):
    fill(tmp_path, 400, segment_bytes=2048).close()
    path, off = _offset_of(tmp_path, 31)  # a kind-2 record: the kind-1 payloads skip it, unchecked no more
    assert path.name == segment_name(list_segments(tmp_path)[0])
    data = bytearray(path.read_bytes())
    data[off + FRAME_SIZE if where == "payload" else off + 8] ^= 1
    path.write_bytes(bytes(data))
    j = Journal.open(tmp_path, segment_bytes=2048)
    with pytest.raises(CorruptJournalError) as info:
        list(j.payloads(next(iter(j.records(1, 1))).position, 1))
    assert (info.value.path, info.value.offset) == (str(path), off)
    j.close()


def test_sealed_segments_are_indexed_and_the_index_gives_the_same_payloads(tmp_path, caplog):
    j = fill(tmp_path, 200, segment_bytes=2048)
    j.close()
    j = Journal.open(tmp_path, durability="none", segment_bytes=2048)  # notes carried on after a reopen
    for i in range(201, 401):
        j.append_group([(2, payload(i)), (3, payload(i))]) if i % 5 == 0 else j.append(1 + i % 3, payload(i))
    j.append_many(2, [payload(i) for i in range(401, 451)])
    j.close()
    segments = list_segments(tmp_path)
    indexes = [tmp_path / index_name(s) for s in segments]
    assert len(segments) > 6 and all(p.exists() for p in indexes[:-1]) and not indexes[-1].exists()
    # what the appends noted is exactly what a walk of the sealed segment finds
    for first, path in zip(segments[:-1], indexes):
        assert path.read_bytes() == build_index(tmp_path / segment_name(first), first,
                                                (tmp_path / segment_name(first)).read_bytes())
    j = Journal.open(tmp_path, segment_bytes=2048)
    j.drop_scanned()
    start = next(iter(j.records(7, 7))).position  # mid-segment, as after a snapshot
    want = {kind: [r.payload for r in j.read_at(start, kind)] for kind in (1, 2, 3)}
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        for kind in (1, 2, 3):
            assert [bytes(p) for p in j.payloads(start, kind)] == want[kind]
    assert caplog.text == ""  # through the indexes, none set aside
    for p in indexes[:-1]:
        p.unlink()
    for kind in (1, 2, 3):
        assert [bytes(p) for p in j.payloads(start, kind)] == want[kind]
    j.close()


def test_readers_take_sealed_segments_from_their_indexes_with_the_same_records(tmp_path, caplog):
    j = fill(tmp_path, 400, segment_bytes=2048)
    j.append_group([(2, payload(401)), (3, payload(402))])  # group_end differs inside a group
    j.close()
    segments = list_segments(tmp_path)
    assert len(segments) > 6 and all((tmp_path / index_name(s)).exists() for s in segments[:-1])
    j = Journal.open(tmp_path, segment_bytes=2048)
    walked = list(j.records(1))  # every frame unpacked and CRC-checked
    j.close()
    assert len(walked) == 402
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        for from_seq in (1, 7, segments[1], segments[1] + 1, segments[-1], 402, 403):
            assert list(read_records(tmp_path, from_seq)) == walked[from_seq - 1:]
    assert caplog.text == ""
    (tmp_path / index_name(segments[1])).write_bytes(b"KBNX not an index")
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        assert list(read_records(tmp_path)) == walked
    assert "walking the segment's frames instead" in caplog.text


@pytest.mark.parametrize("damage", ["index byte", "other segment's index", "segment length"])
def test_an_index_that_does_not_match_is_ignored(tmp_path, caplog, damage):
    fill(tmp_path, 400, segment_bytes=2048).close()
    first, second = list_segments(tmp_path)[:2]
    path = tmp_path / index_name(first)
    if damage == "index byte":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 1
        path.write_bytes(bytes(data))
    elif damage == "other segment's index":
        path.write_bytes((tmp_path / index_name(second)).read_bytes())
    else:  # a well-formed index whose segment is not the one it describes (another length)
        from crc32c import crc32c

        from engine.journal._index import INDEX_HEADER
        index = path.read_bytes()
        fields = list(INDEX_HEADER.unpack_from(index))
        fields[4] += 1
        head = INDEX_HEADER.pack(*fields)
        head = head[:-4] + crc32c(head[:-4]).to_bytes(4, "little")
        path.write_bytes(head + index[INDEX_HEADER.size:])
    j = Journal.open(tmp_path, segment_bytes=2048)
    j.drop_scanned()
    start = next(iter(j.records(1, 1))).position
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        got = [bytes(p) for p in j.payloads(start, 2)]
    assert got == [r.payload for r in j.read_at(start, 2)]
    assert "walking the segment's frames instead" in caplog.text
    j.close()


def test_bad_segment_header_is_an_error(tmp_path):
    fill(tmp_path, 10).close()
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    data[0] = ord("X")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError, match="segment header"):
        Journal.open(tmp_path)


def test_half_created_segment_is_dropped(tmp_path):
    fill(tmp_path, 10).close()
    (tmp_path / segment_name(11)).write_bytes(b"KBN")  # crash while rolling
    j = Journal.open(tmp_path)
    assert j.last_seq == 10 and list_segments(tmp_path) == [1]
    j.append(1, b"x")
    j.close()


@pytest.mark.parametrize("size", [24, 4096])
def test_a_newest_segment_of_zeros_is_dropped_like_a_half_created_one(tmp_path, caplog, size):
    """After a power loss some file systems give back a file that was extended but never
    written as zeros: a segment created by a roll, synced never. Nothing in it was confirmed."""
    fill(tmp_path, 10).close()
    (tmp_path / segment_name(11)).write_bytes(bytes(size))
    with caplog.at_level(logging.WARNING, logger="kaboni.journal"):
        j = Journal.open(tmp_path)
    assert "removing it" in caplog.text
    assert j.last_seq == 10 and list_segments(tmp_path) == [1]
    assert j.append(1, b"x") == 11
    j.close()
    assert [r.seq for r in read_records(tmp_path)] == list(range(1, 12))


def test_a_zeroed_header_before_valid_frames_is_still_an_error(tmp_path):
    fill(tmp_path, 10).close()
    path = tmp_path / segment_name(1)
    data = bytearray(path.read_bytes())
    data[:SEGMENT_HEADER.size] = bytes(SEGMENT_HEADER.size)  # records follow: damage, not a torn roll
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError, match="segment header"):
        Journal.open(tmp_path)


# ---------------------------------------------------------------------------------------------
# An instrumented file layer: what has really been synced, and a simulated power loss


class TracingOps(FileOps):
    """Real system calls, plus a model of the disk: bytes written vs bytes covered by a sync."""

    def __init__(self, sync_delay: float = 0.0, fail_sync_at: int | None = None) -> None:
        self.lock = threading.Lock()
        self.paths: dict[int, str] = {}
        self.written: dict[str, bytearray] = {}
        self.synced: dict[str, bytes] = {}
        self.dir_synced: set[str] = set()
        self.created_unsynced: set[str] = set()
        self.in_sync = 0
        self.syncs = 0
        self.sync_delay = sync_delay
        self.fail_sync_at = fail_sync_at

    def create(self, path):
        fd = super().create(path)
        with self.lock:
            self.paths[fd] = path
            self.written[path] = bytearray()
            self.synced[path] = b""
            self.created_unsynced.add(path)
        return fd

    def open_append(self, path):
        fd = super().open_append(path)
        with self.lock:
            self.paths[fd] = path
            data = Path(path).read_bytes()
            self.written[path] = bytearray(data)
            self.synced[path] = data
        return fd

    def write(self, fd, data):
        n = super().write(fd, data)
        with self.lock:
            self.written[self.paths[fd]] += bytes(data[:n])
        return n

    def sync(self, fd):
        with self.lock:
            self.in_sync += 1
            self.syncs += 1
            snapshot = bytes(self.written[self.paths[fd]])
            fail = self.fail_sync_at is not None and self.syncs >= self.fail_sync_at
        try:
            if fail:
                raise OSError(5, "Input/output error (injected)")
            if self.sync_delay:
                time.sleep(self.sync_delay)
            super().sync(fd)
            with self.lock:
                self.synced[self.paths[fd]] = snapshot  # what was written before the call is on disk
        finally:
            with self.lock:
                self.in_sync -= 1

    def sync_dir(self, path):
        super().sync_dir(path)
        with self.lock:
            self.created_unsynced.clear()

    def power_loss_image(self, target: Path) -> None:
        """The disk after a power cut: synced bytes only; files whose directory entry was never
        synced are gone."""
        target.mkdir()
        with self.lock:
            for path, data in self.synced.items():
                if path in self.created_unsynced:
                    continue
                (target / Path(path).name).write_bytes(data)


class TracingDsyncOps(TracingOps):
    """The same model of the disk for the default fsync path: one ``pwritev2(RWF_DSYNC)`` per
    batch, whose bytes are on disk when it returns (with everything written before them)."""

    def write_durable(self, fd, data):
        with self.lock:
            self.in_sync += 1
            self.syncs += 1
        try:
            if self.sync_delay:
                time.sleep(self.sync_delay)
            n = super().write_durable(fd, data)
            with self.lock:
                path = self.paths[fd]
                self.written[path] += bytes(data[:n])
                self.synced[path] = bytes(self.written[path])
            return n
        finally:
            with self.lock:
                self.in_sync -= 1


def _durable_seqs(ops: TracingOps) -> int:
    """Highest seq whose whole prefix is in synced bytes."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "img"
        ops.power_loss_image(image)
        seqs = [r.seq for r in read_records(image)]
    assert seqs == list(range(1, len(seqs) + 1))
    return len(seqs)


@pytest.mark.parametrize("layer", [TracingOps, TracingDsyncOps], ids=["write+fdatasync", "pwritev2-dsync"])
def test_no_durability_callback_before_its_fdatasync_returns(tmp_path, layer):
    ops = layer(sync_delay=0.002)
    violations = []
    called = []

    def on_durable(seq):
        called.append(seq)
        if _durable_seqs(ops) < seq:
            violations.append(seq)

    j = Journal.open(tmp_path / "j", on_durable=on_durable, file_ops=ops, segment_bytes=8192)
    for i in range(1, 3001):
        j.append(1, payload(i))
        if i % 100 == 0:
            time.sleep(0.01)
    j.sync()
    j.close()
    assert called and called[-1] == 3000
    assert len(called) > 5  # many batches, each checked
    assert violations == []


@pytest.mark.parametrize("layer", [TracingOps, TracingDsyncOps], ids=["write+fdatasync", "pwritev2-dsync"])
def test_power_loss_loses_nothing_confirmed(tmp_path, layer):
    ops = layer(sync_delay=0.001)
    confirmed = [0]
    j = Journal.open(tmp_path / "j", on_durable=lambda s: confirmed.__setitem__(0, s), file_ops=ops,
                     segment_bytes=16384)
    assert j._dsync == (layer is TracingDsyncOps)  # the layer really takes the path it is named for
    stop = time.monotonic() + 0.5
    i = 0
    while time.monotonic() < stop:
        i += 1
        j.append_group([(2, payload(i)), (3, b"entry-%d" % i)])
        if i % 97 == 0:
            time.sleep(0.0005)
    # the power goes: take the image while appends are still in flight
    with ops.lock:
        last_confirmed = confirmed[0]
    ops.power_loss_image(tmp_path / "after")
    j.close()
    assert last_confirmed > 100
    j2 = Journal.open(tmp_path / "after")
    assert j2.last_seq >= last_confirmed
    assert j2.last_seq % 2 == 0  # whole groups only
    j2.close()
    assert [r.seq for r in read_records(tmp_path / "after")] == list(range(1, j2.last_seq + 1))


def test_sync_failure_stops_appends_and_reports_nothing_more(tmp_path):
    ops = TracingOps(fail_sync_at=4)  # sync 1 is the new segment's header
    durable = []
    errors = []
    j = Journal.open(tmp_path / "j", on_durable=durable.append, on_error=errors.append, file_ops=ops)
    for i in range(1, 4):
        j.append(1, payload(i))
        assert j.wait_durable(i, timeout=2) is (i < 3)
    assert len(errors) == 1 and isinstance(errors[0], OSError)
    assert durable == [1, 2]  # the 3rd sync failed: seq 3 is never reported durable
    assert isinstance(j.failed, OSError)
    with pytest.raises(JournalFailedError):
        j.append(1, b"more")
    with pytest.raises(JournalFailedError):
        j.sync()
    j.close()


def test_durability_none_still_writes(tmp_path):
    j = Journal.open(tmp_path, durability="none")
    j.append(1, b"a")
    j.sync()
    j.close()
    assert [r.payload for r in read_records(tmp_path)] == [b"a"]
    with pytest.raises(ValueError):
        Journal.open(tmp_path, durability="sometimes")
    j = Journal.open(tmp_path)
    j.close()
    with pytest.raises(JournalError):
        j.append(1, b"closed")


def test_append_many_frames_each_record_as_its_own_group(tmp_path):
    j = Journal.open(tmp_path, durability="none", segment_bytes=1024)
    j.append(1, b"first")
    assert j.append_many(2, [payload(i) for i in range(2, 202)]) == 201
    assert j.append_many(2, []) == 201
    last = j.last_position
    j.sync()
    assert next(iter(j.read_at(last))).seq == 201
    j.close()
    recs = list(read_records(tmp_path))
    assert [r.seq for r in recs] == list(range(1, 202)) and all(r.group_end for r in recs)
    assert [r.payload for r in recs[1:]] == [payload(i) for i in range(2, 202)]


def test_records_appended_while_a_batch_is_framed_keep_their_seqs(tmp_path, monkeypatch):
    """append_many frames its batch before it takes the lock; a record appended in between
    (by another thread) takes the seq the batch was framed with, so the batch is framed again."""
    from engine.journal import _log

    j = Journal.open(tmp_path, durability="none")
    j.append(1, b"first")
    original = _log._frame_into
    calls = []

    def frame_then_interleave(buf, first, kinds, payloads, max_payload):
        last_len = original(buf, first, kinds, payloads, max_payload)
        calls.append(first)
        if len(calls) == 1:
            assert j.append(3, b"between") == 2  # lands while the batch is framed but not added
        return last_len

    monkeypatch.setattr(_log, "_frame_into", frame_then_interleave)
    batch = [payload(i) for i in range(10)]
    assert j.append_many(2, batch) == 12
    assert calls == [2, 3]  # framed from seq 2, then again from seq 3
    j.close()
    recs = list(read_records(tmp_path))  # every CRC checked
    assert [r.seq for r in recs] == list(range(1, 13))
    assert [r.payload for r in recs] == [b"first", b"between", *batch]
    assert all(r.group_end for r in recs)


def test_threads_appending_at_once_get_one_gap_free_sequence(tmp_path):
    j = Journal.open(tmp_path, durability="none", segment_bytes=4096)
    threads = 4
    per = 300

    def producer(t):
        for i in range(per):
            body = b"%d-%d" % (t, i)
            if i % 3 == 0:
                j.append(1, body)
            elif i % 3 == 1:
                j.append_many(2, [body + b"a", body + b"b"])
            else:
                j.append_group([(3, body + b"x"), (3, body + b"y")])

    workers = [threading.Thread(target=producer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    j.close()
    recs = list(read_records(tmp_path))
    assert [r.seq for r in recs] == list(range(1, len(recs) + 1))
    assert len(recs) == threads * (per // 3) * 5
    for t in range(threads):  # each thread's records in its own order, groups whole
        mine = [r for r in recs if r.payload.startswith(b"%d-" % t)]
        expected = []
        for i in range(per):
            body = b"%d-%d" % (t, i)
            expected += ([body] if i % 3 == 0 else [body + b"a", body + b"b"] if i % 3 == 1
                         else [body + b"x", body + b"y"])
        assert [r.payload for r in mine] == expected
        assert [r.group_end for r in mine if r.kind == 3] == [False, True] * (per // 3)


def test_open_lowers_the_switch_interval_unless_told_not_to(tmp_path):
    import sys

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)
        Journal.open(tmp_path / "a", durability="none", switch_interval=None).close()
        assert sys.getswitchinterval() == pytest.approx(0.005)
        Journal.open(tmp_path / "b", durability="none").close()
        assert sys.getswitchinterval() == pytest.approx(0.0001)
    finally:
        sys.setswitchinterval(before)


def test_fsync_mode_makes_each_batch_durable_with_one_dsync_write(tmp_path, monkeypatch):
    """The plain file layer writes each batch with pwritev2(RWF_DSYNC) (durable on return, no
    separate fdatasync); no durability callback comes before the write covering its records."""
    if not hasattr(os, "RWF_DSYNC"):
        pytest.skip("no RWF_DSYNC on this platform")  # Linux >= 4.7 has it
    real_pwritev, real_fdatasync = os.pwritev, os.fdatasync
    lock = threading.Lock()
    state = {"durable_bytes": 0, "flags": set(), "fdatasyncs": 0}

    def pwritev(fd, buffers, offset, flags=0):
        n = real_pwritev(fd, buffers, offset, flags)
        with lock:
            state["flags"].add(flags)
            state["durable_bytes"] += n
        return n

    def fdatasync(fd):
        with lock:
            state["fdatasyncs"] += 1
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    seen = []
    j = Journal.open(tmp_path, on_durable=lambda seq: seen.append((seq, state["durable_bytes"])))
    syncs_at_open = state["fdatasyncs"]
    for i in range(1, 401):
        j.append(1, payload(i))
        if i % 50 == 0:
            j.sync()
    j.close()
    assert state["flags"] == {os.RWF_DSYNC} and state["fdatasyncs"] == syncs_at_open
    data = (tmp_path / segment_name(1)).read_bytes()
    assert seen and seen[-1][0] == 400
    for seq, durable in seen:
        # the frames inside the bytes made durable before the callback reach seq
        off, last = 24, 0
        while off + FRAME_SIZE <= 24 + durable:
            length, rec_seq = int.from_bytes(data[off + 4:off + 8], "little"), int.from_bytes(data[off + 8:off + 16], "little")
            if off + FRAME_SIZE + length > 24 + durable:
                break
            last = rec_seq
            off += FRAME_SIZE + length
        assert last >= seq


def test_a_second_open_of_a_live_journal_is_refused(tmp_path):
    """Two processes appending to one journal would interleave seqs; the second open is refused
    before it recovers or writes anything."""
    j = fill(tmp_path, 3)
    with pytest.raises(JournalLockedError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        Journal.open(tmp_path)
    assert j.append(1, b"still mine") == 4
    j.close()
    j = Journal.open(tmp_path)
    assert j.last_seq == 4
    j.close()


def test_a_file_in_place_of_the_directory_is_named(tmp_path):
    (tmp_path / "data").write_text("not a journal")
    with pytest.raises(JournalError, match="data is not a directory"):
        Journal.open(tmp_path / "data")


def test_the_lock_goes_with_the_process_that_held_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.journal import Journal; "
         "j = Journal.open(sys.argv[1]); j.append(1, b'x'); j.sync(); print('open', flush=True); time.sleep(60)",
         str(tmp_path)], stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout.readline() == b"open\n"
        with pytest.raises(JournalLockedError, match=f"pid {holder.pid}"):
            Journal.open(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    j = Journal.open(tmp_path)  # SIGKILL released it
    assert j.last_seq == 1
    j.close()


class FailingCreate(FileOps):
    """Creating any segment after the first fails (a full disk while rolling)."""

    def __init__(self) -> None:
        self.creates = 0

    def create(self, path):
        self.creates += 1
        if self.creates > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().create(path)


def test_a_failed_roll_leaves_no_stale_descriptor_for_close(tmp_path):
    errors = []
    j = Journal.open(tmp_path / "j", segment_bytes=256, file_ops=FailingCreate(), on_error=errors.append)
    for i in range(1, 40):
        try:
            j.append(1, payload(i))
        except JournalFailedError:
            break
    with pytest.raises(JournalFailedError):
        j.sync(timeout=5)
    assert errors and errors[0].errno == errno.ENOSPC
    # the old segment's descriptor number is free again; whatever reuses it must survive close()
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)
    try:
        j.close()
        os.fstat(other)
    finally:
        os.close(other)


def test_concurrent_closes_close_the_file_once_and_all_return_after_it(tmp_path):
    closed = []

    class Ops(FileOps):
        def close(self, fd):
            closed.append(fd)
            time.sleep(0.01)  # a slow close: the other closers must wait for it, not repeat it
            super().close(fd)

    j = Journal.open(tmp_path, file_ops=Ops())
    j.append(1, payload(1))
    seen = []

    def close():
        j.close()
        seen.append(len(closed))  # each caller returns only once the one close is done

    threads = [threading.Thread(target=close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(closed) == 1 and seen == [1, 1, 1, 1]
    Journal.open(tmp_path, durability="none").close()  # and the directory's lock was let go


@pytest.mark.parametrize("kind", [0, 128, 200, -1])
def test_a_kind_outside_1_to_127_is_refused_and_appends_nothing(tmp_path, kind):
    j = Journal.open(tmp_path, durability="none")
    try:
        with pytest.raises(ValueError, match="kinds are 1..127"):
            j.append(kind, b"x")
        with pytest.raises(ValueError, match="kinds are 1..127"):
            j.append_group([(1, b"a"), (kind, b"b")])
        with pytest.raises(ValueError, match="kinds are 1..127"):
            j.append_many(kind, [b"a", b"b"])
        assert j.last_seq == 0
        assert j.append(127, b"ok") == 1
    finally:
        j.close()
