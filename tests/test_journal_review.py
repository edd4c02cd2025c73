"""Review findings in the settlement journal: each test failed before its fix."""

from __future__ import annotations

import errno
import os
import random

import msgspec
import pytest

from engine import NewOrder, demo_config
from engine.journal import (
    CorruptJournalError, FileOps, Journal, JournalFailedError, Ledger, list_segments, read_records,
)
import engine.journal._log as journal_log
from engine.journal._format import MAX_PAYLOAD, pack_position, segment_name, unpack_position
from engine.journal._index import index_name, load_index
from engine.journal._snapshot import list_snapshots, read_snapshot, snapshot_name, write_snapshot

pytestmark = pytest.mark.timeout(60)

DAY = "2026-11-24"
MEMBERS = [f"M{i:02d}" for i in range(1, 7)]


def orders(rng: random.Random, n: int, prefix: str = "o"):
    for i in range(n):
        yield (NewOrder(f"{prefix}{i}", "CEA25", rng.choice(["buy", "sell"]), rng.randint(1, 20),
                        9250 + rng.randint(-10, 10)), rng.choice(MEMBERS))


def fill_ledger(ledger: Ledger, n: int, seed: int = 1, ts0: int = 1_000) -> None:
    for k, (cmd, m) in enumerate(orders(random.Random(seed), n)):
        ledger.execute(cmd, m, ts0 + k)


def test_an_unusable_snapshot_falls_back_to_a_full_replay_from_record_1(tmp_path):
    """A snapshot that reads back whole but cannot be restored (here: an engine snapshot of
    another version, as after an upgrade) must leave a full replay from the START record. The
    loop over snapshots reused the name of the START record, so the "full" replay began at the
    unusable snapshot's entry on a fresh engine: a silently wrong state."""
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=10**9) as ledger:
        fill_ledger(ledger, 200)
        ledger.snapshot()
        ledger.wait_snapshots()
        fill_ledger(ledger, 50, seed=2, ts0=5_000)
        live_hash = ledger.engine.state_hash()
        ledger.journal.sync()
        snaps = list_snapshots(tmp_path)
    for s in list_snapshots(tmp_path):
        if s not in snaps:
            os.unlink(tmp_path / snapshot_name(s))  # the one close() wrote
    (seq,) = snaps
    body = read_snapshot(tmp_path / snapshot_name(seq))
    state = msgspec.msgpack.decode(body.engine)
    state[0] += 1  # an engine snapshot format this build does not read
    write_snapshot(tmp_path, msgspec.structs.replace(body, engine=msgspec.msgpack.encode(state)), sync=False)
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        assert ledger.engine.state_hash() == live_hash


def _segmented_journal(directory, n: int = 60, segment_bytes: int = 300) -> list[int]:
    j = Journal.open(directory, durability="none", segment_bytes=segment_bytes)
    for i in range(1, n + 1):
        j.append(1 + i % 2, b"p%03d" % i * 5)
    j.close()
    return list_segments(directory)


@pytest.mark.parametrize("indexed", [True, False], ids=["with-indexes", "walking"])
def test_a_missing_segment_is_not_silently_skipped_by_the_journal_readers(tmp_path, indexed, monkeypatch):
    """Seqs are gap-free across segments and a replay checks every record, so a sealed segment
    that is gone (a partial copy of the directory, a mistaken delete) must be an error that
    names where the sequence breaks. ``records``, ``read_at`` and ``payload_spans`` (the
    Ledger's replay and report paths) reset their expected seq to each segment's first and
    went on from the next segment as if nothing were missing."""
    segments = _segmented_journal(tmp_path)
    assert len(segments) > 4
    gone = segments[2]
    (tmp_path / segment_name(gone)).unlink()
    (tmp_path / index_name(gone)).unlink()
    if not indexed:
        for first in segments:
            (tmp_path / index_name(first)).unlink(missing_ok=True)
    after = tmp_path / segment_name(segments[3])
    # the open refuses it (its check of the sealed segments' ends: test_journal_recovery_review)
    with pytest.raises(CorruptJournalError) as info:
        Journal.open(tmp_path, durability="none", segment_bytes=300)
    assert info.value.path == str(tmp_path / segment_name(segments[1])) and "missing" in str(info.value)
    # and so do the readers, should the open's check ever be passed by
    monkeypatch.setattr(journal_log, "_check_sealed_end", lambda path, next_first: None)
    j = Journal.open(tmp_path, durability="none", segment_bytes=300)
    try:
        with pytest.raises(CorruptJournalError) as info:
            list(j.records(1))
        assert info.value.path == str(after) and f"{gone} expected" in str(info.value)
        with pytest.raises(CorruptJournalError):
            list(j.read_at(pack_position(segments[1], 24)))
        for kind in (1, 2):
            with pytest.raises(CorruptJournalError) as info:
                list(j.payload_spans(pack_position(1, 24), kind))
            assert info.value.path == str(after)
    finally:
        j.close()


def test_a_record_recovery_would_drop_is_refused_when_appended(tmp_path):
    """Recovery treats a length over MAX_PAYLOAD as a torn frame, but the appends took any
    size: a record confirmed durable was truncated at the next open as a "torn tail" (or, with
    records after it, stopped startup as corruption). The appends now refuse it whole, before
    anything is framed, so the journal goes on intact."""
    j = Journal.open(tmp_path, durability="none")
    j.append(1, b"a")
    big = bytes(MAX_PAYLOAD + 1)
    with pytest.raises(ValueError):
        j.append(1, big)
    with pytest.raises(ValueError):
        j.append_group([(2, b"fill"), (3, big)])
    with pytest.raises(ValueError):
        j.append_many(2, [b"x", big])
    del big
    assert j.append(1, b"b") == 2
    assert j.append(1, bytes(MAX_PAYLOAD)) == 3  # the largest record recovery keeps
    j.sync()
    j.close()
    j = Journal.open(tmp_path, durability="none")
    try:
        assert j.last_seq == 3
        assert [(r.seq, r.payload[:1]) for r in j.records()] == [(1, b"a"), (2, b"b"), (3, b"\0")]
    finally:
        j.close()


def _cli(*argv: str) -> tuple[int, str, str]:
    import argparse
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from gateway._journal_cli import add_journal_commands

    parser = argparse.ArgumentParser(prog="kaboni")
    add_journal_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = args.func(args)
    return code, out.getvalue(), err.getvalue()


def test_journal_dump_shows_records_of_a_kind_it_does_not_know(tmp_path):
    """New record kinds may be added within a format version and readers skip them; ``journal
    dump`` crashed on one (TypeError: its decoded payload, a list, was spread as a mapping)."""
    import json

    j = Journal.open(tmp_path, durability="none")
    j.append(1, msgspec.msgpack.encode([1, DAY, "digest", "EXCHANGE"]))
    j.append(9, msgspec.msgpack.encode([1, "two", 3]))  # a kind from a later build
    j.append(10, b"\xc1 not msgpack")
    j.close()
    code, out, err = _cli("journal", "dump", str(tmp_path))
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [(r["seq"], r["kind"]) for r in lines] == [(1, "START"), (2, 9), (3, 10)]
    assert lines[1]["payload"] == [1, "two", 3]
    assert lines[2]["payload"] == b"\xc1 not msgpack".hex()


def test_segments_are_kept_within_what_a_position_can_address(tmp_path):
    """A position packs a byte offset into 32 bits (``segment << 32 | offset``), but any
    ``segment_bytes`` was taken: with a segment past 4 GiB the offsets spilled into the segment
    field (measured: after 64 appends of 64 MiB to a 5 GiB-segment journal, the next record's
    position read back as segment 1, offset 1112: record 2's), so ``read_at``, the report index
    and snapshot positions pointed at the wrong records. A segment of up to 2 GiB leaves room
    for its last group, so a larger ``segment_bytes`` is refused at open."""
    with pytest.raises(ValueError, match="segment_bytes"):
        Journal.open(tmp_path / "a", segment_bytes=5 << 30)
    with pytest.raises(ValueError, match="segment_bytes"):
        Ledger.open(demo_config(), tmp_path / "b", today=DAY, durability="none", segment_bytes=(2 << 30) + 1)
    Journal.open(tmp_path / "c", durability="none", segment_bytes=2 << 30).close()


class FailingClose(FileOps):
    """``close`` of a sealed segment reports EIO (a deferred write error, as NFS and some file
    systems give); like Linux, the descriptor is released all the same."""

    def close(self, fd):
        super().close(fd)
        raise OSError(errno.EIO, "Input/output error (injected)")


def test_a_failed_close_at_a_roll_leaves_no_stale_descriptor_for_close(tmp_path):
    """The writer cleared its descriptor only after ``close`` returned: when closing the sealed
    segment failed, the journal failed (as it should) but kept the released number, and
    ``Journal.close`` later closed whatever file had been given that number since."""
    errors = []
    j = Journal.open(tmp_path / "j", segment_bytes=256, file_ops=FailingClose(), on_error=errors.append)
    for i in range(1, 40):
        try:
            j.append(1, b"record-%d" % i * 8)
        except JournalFailedError:
            break
    with pytest.raises(JournalFailedError):
        j.sync(timeout=5)
    assert errors and errors[0].errno == errno.EIO
    other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)
    try:
        j.close()
        os.fstat(other)  # still open: the journal did not close it
    finally:
        os.close(other)


def test_a_journal_without_its_first_segment_is_named_as_such_at_open(tmp_path):
    """Record 1 (START) is read first at a restart; with the first segment gone (a partial
    copy, archived segments), ``Ledger.open`` raised a bare ``StopIteration``: an empty
    message in the gateway's ``journal_open_failed`` line, and a ``RuntimeError`` wherever it
    is called from a generator. It now says which file the journal starts with."""
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", segment_bytes=8192) as ledger:
        fill_ledger(ledger, 300)
    segments = list_segments(tmp_path)
    assert len(segments) > 2 and list_snapshots(tmp_path)
    (tmp_path / segment_name(1)).unlink()
    (tmp_path / index_name(1)).unlink()
    with pytest.raises(CorruptJournalError) as info:
        Ledger.open(demo_config(), tmp_path, durability="none", segment_bytes=8192)
    assert info.value.path == str(tmp_path / segment_name(segments[1]))
    assert f"starts at seq {segments[1]}" in str(info.value)


def test_read_records_on_a_live_journal_judges_its_tail_by_the_bytes_it_read(tmp_path):
    """``read_records`` (``journal dump``, ``stats``, ``settle``) reads without the lock, so
    it may run while the exchange appends. It walked the newest segment up to the end of file
    it saw, then read the tail again to tell a torn write from corruption: if the writer had
    completed the cut-off frame and written more in between, the later frames made a healthy
    journal look corrupt (seen about one read in ten under load). Here the writer's
    completion is played in between, deterministically."""
    j = Journal.open(tmp_path, durability="none")
    for i in range(1, 13):
        j.append(1, b"record-%d-" % i * 10)
    j.close()
    path = tmp_path / segment_name(1)
    data = path.read_bytes()
    eleventh = unpack_position(next(r.position for r in read_records(tmp_path) if r.seq == 11))[1]
    path.write_bytes(data[:eleventh + 30])  # the writer is in the middle of record 11
    records = read_records(tmp_path)
    assert [next(records).seq for _ in range(10)] == list(range(1, 11))
    with open(path, "ab") as f:  # ... and now it has finished it and written record 12
        f.write(data[eleventh + 30:])
    assert list(records) == []  # a torn tail as far as this read goes: no error
    assert [r.seq for r in read_records(tmp_path)] == list(range(1, 13))


@pytest.mark.parametrize("day", ["20261124", "2026-W48-2"])
def test_settle_refuses_a_day_not_written_yyyy_mm_dd(tmp_path, day):
    """FILL records carry the day as YYYY-MM-DD, and ``--day`` was checked with
    ``date.fromisoformat``, which in Python 3.11 also takes 20261124 and 2026-W48-2: such a
    day passed, matched no FILL, and ``settle`` printed an empty report with exit 0."""
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none") as ledger:
        fill_ledger(ledger, 100)
    code, out, _ = _cli("settle", str(tmp_path), "--day", DAY)
    assert code == 0 and len(out.splitlines()) > 1
    with pytest.raises(SystemExit):
        _cli("settle", str(tmp_path), "--day", day)


def test_offline_readers_refuse_a_journal_whose_first_segment_is_gone(tmp_path):
    """Every journal starts at seq 1, but ``scan_journal`` and ``read_records`` started from
    whatever segment came first: a copy without its first segment passed ``journal verify``
    (exit 0), and ``settle`` summed the fills it had left, under the default fee account,
    with exit 0: a wrong report that looked right."""
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", segment_bytes=8192) as ledger:
        fill_ledger(ledger, 300)
    segments = list_segments(tmp_path)
    assert len(segments) > 2
    (tmp_path / segment_name(1)).unlink()
    (tmp_path / index_name(1)).unlink()
    second = str(tmp_path / segment_name(segments[1]))
    with pytest.raises(CorruptJournalError) as info:
        list(read_records(tmp_path))
    assert info.value.path == second
    assert [r.seq for r in read_records(tmp_path, segments[1] + 2)][:1] == [segments[1] + 2]  # asked for: there
    for argv in (("journal", "verify", str(tmp_path)), ("settle", str(tmp_path), "--day", DAY),
                 ("journal", "stats", str(tmp_path)), ("journal", "dump", str(tmp_path))):
        code, _, err = _cli(*argv)
        assert code == 1 and second in err, argv


def test_an_index_left_beside_the_newest_segment_does_not_outlive_its_bytes(tmp_path, monkeypatch):
    """A crash while rolling (the new segment half created, removed at open) makes the sealed
    segment before it the newest again, appended to, with the index it got when it was sealed.
    If the next crash came between its next sealing and the new index, that stale index was
    still there: ``index_missing`` only indexes segments that have none, so every replay
    warned and walked the segment, for good. Recovery now removes an index beside the newest
    segment (which is never read through one), so the segment is indexed once sealed."""
    import engine.journal._log as log_module

    j = Journal.open(tmp_path, durability="none", segment_bytes=300)
    for i in range(1, 31):
        j.append(1, b"r%03d" % i * 5)
    j.close()
    segments = list_segments(tmp_path)
    os.truncate(tmp_path / segment_name(segments[-1]), 10)  # a crash while rolling to it
    again = segments[-2]  # the newest again, with the index it got when it was sealed
    assert (tmp_path / index_name(again)).exists()
    with monkeypatch.context() as patch:
        patch.setattr(log_module, "write_index", lambda *args: None)  # the next crash: before indexing
        j = Journal.open(tmp_path, durability="none", segment_bytes=600)
        for i in range(31, 45):
            j.append(1, b"r%03d" % i * 5)
        j.close()
    assert list_segments(tmp_path)[-2] == again  # sealed again, grown
    j = Journal.open(tmp_path, durability="none", segment_bytes=600)
    j.index_missing()
    j.close()
    load_index(tmp_path, again, (tmp_path / segment_name(again)).read_bytes())  # usable


class NoSpace(FileOps):
    def write(self, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


class SyncFails(FileOps):
    def sync(self, fd):
        raise OSError(errno.EIO, "Input/output error (injected)")


@pytest.mark.parametrize("ops", [NoSpace, SyncFails], ids=["write-ENOSPC", "sync-EIO"])
def test_a_new_journal_that_cannot_be_written_leaks_no_descriptor(tmp_path, ops):
    """Creating a journal writes and syncs the first segment's header; when that failed,
    ``Journal.open`` raised (as it should) but left the segment's descriptor open."""
    with pytest.raises(OSError):
        Journal.open(tmp_path, file_ops=ops())
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            held.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass  # the listing's own descriptor, closed by now
    assert str(tmp_path / segment_name(1)) not in held
    j = Journal.open(tmp_path, durability="none")  # and the directory is still usable
    assert j.last_seq == 0
    j.close()


@pytest.mark.parametrize("segment_bytes", [0, 24])
def test_a_segment_size_that_cannot_hold_a_record_is_refused(tmp_path, segment_bytes):
    """A segment is rolled once it holds ``segment_bytes``; at 24 or less (a header's size) a
    fresh segment was already "full", so the first append rolled it into a new segment with
    the same first seq: a second header written into the same file, a journal that
    ``read_records`` (and a full replay) then found corrupt. Such a size is now refused."""
    with pytest.raises(ValueError, match="segment_bytes"):
        Journal.open(tmp_path, durability="none", segment_bytes=segment_bytes)
    assert list_segments(tmp_path) == []
    j = Journal.open(tmp_path, durability="none", segment_bytes=25)  # one record per segment
    for i in range(3):
        j.append(1, b"x%d" % i)
    j.close()
    assert [r.seq for r in read_records(tmp_path)] == [1, 2, 3]
