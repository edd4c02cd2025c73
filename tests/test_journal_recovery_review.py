"""Recovery review (durability audit): damage that recovery took for a torn tail, a lock that
could be deleted from under the exchange, sealed segments that were never checked at open, and
`journal verify` disagreeing with startup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import engine.journal._log as journal_log
from engine.journal import CorruptJournalError, FileOps, Journal, list_segments, read_records, scan_journal
from engine.journal._format import segment_name, unpack_position
from engine.journal._index import index_name, load_index

ROOT = Path(__file__).resolve().parent.parent


def payload(i: int, size: int = 300) -> bytes:
    return (b"record-%d-" % i).ljust(size, b".")


def fill(directory: Path, n: int, size: int = 300, **kw) -> None:
    j = Journal.open(directory, durability="none", **kw)
    for i in range(1, n + 1):
        j.append(3, payload(i, size))
    j.sync()
    j.close()


def offset_of(directory: Path, seq: int) -> int:
    for rec in read_records(directory):
        if rec.seq == seq:
            return unpack_position(rec.position)[1]
    raise AssertionError(seq)


def damage(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


# ---------------------------------------------------------------------------------------------
# F1: a damaged stretch in the middle of the newest segment is corruption, however long


@pytest.mark.parametrize("zeroed", [4096, 96 * 1024, 1 << 20])
def test_a_zeroed_stretch_before_valid_records_stops_startup_whatever_its_length(tmp_path, zeroed):
    """The look-ahead searched only the next 256 seqs: 96 KiB of zeros (more than 256 records)
    in the middle of the newest segment passed for a torn tail, and the open truncated every
    record after it (16,632 synced ones in the audit's journal), with `verify` saying exit 0."""
    fill(tmp_path, 8000)  # about 2.5 MB
    path = tmp_path / segment_name(1)
    size = path.stat().st_size
    start = offset_of(tmp_path, 2000)
    damage(path, start, bytes(zeroed))
    for check in (lambda: Journal.open(tmp_path), lambda: scan_journal(tmp_path), lambda: list(read_records(tmp_path))):
        with pytest.raises(CorruptJournalError, match="valid records after it") as err:
            check()
        assert err.value.path == str(path) and err.value.offset == start
    assert path.stat().st_size == size  # nothing truncated
    verify = cli("journal", "verify", str(tmp_path))
    assert verify.returncode == 1 and f"offset {start}" in verify.stderr


def test_garbage_to_the_end_longer_than_one_write_is_corruption(tmp_path, monkeypatch):
    """With nothing valid after the damage, a torn write still cannot be longer than the most
    the writer writes before it syncs (WRITE_LIMIT)."""
    monkeypatch.setattr(journal_log, "WRITE_LIMIT", 64 * 1024)
    fill(tmp_path, 2000)
    path = tmp_path / segment_name(1)
    start = offset_of(tmp_path, 1000)
    end = path.stat().st_size
    rng = __import__("random").Random(7)
    damage(path, start, rng.randbytes(end - start))  # random bytes hold no valid frame
    with pytest.raises(CorruptJournalError, match="more than one write") as err:
        Journal.open(tmp_path)
    assert err.value.offset == start and path.stat().st_size == end
    # the same garbage, but no longer than one write: a torn tail, truncated
    os.truncate(path, start + 60 * 1024)
    j = Journal.open(tmp_path)
    assert j.last_seq == 999 and path.stat().st_size == start
    j.close()


def test_a_cut_off_large_record_is_still_a_torn_tail(tmp_path, monkeypatch):
    """A record longer than WRITE_LIMIT, cut off: its bytes after its intact header are one
    frame's, not more records."""
    monkeypatch.setattr(journal_log, "WRITE_LIMIT", 4096)
    fill(tmp_path, 50)
    j = Journal.open(tmp_path, durability="none")
    j.append(3, b"x" * 100_000)
    j.close()
    path = tmp_path / segment_name(1)
    os.truncate(path, path.stat().st_size - 10)
    j = Journal.open(tmp_path)
    assert j.last_seq == 50
    j.close()


class Recording(FileOps):
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def write(self, fd, data):
        n = super().write(fd, data)
        self.calls.append(("write", n))
        return n

    def sync(self, fd):
        super().sync(fd)
        self.calls.append(("sync", 0))


class RecordingDsync(Recording):
    def write_durable(self, fd, data):
        n = super().write_durable(fd, data)
        self.calls.append(("durable", n))
        return n


@pytest.mark.parametrize("ops_type", [Recording, RecordingDsync])
def test_the_writer_makes_at_most_write_limit_bytes_durable_at_a_time(tmp_path, ops_type):
    ops = ops_type()
    j = Journal.open(tmp_path, file_ops=ops)
    j._write_limit = 10_000
    ops.calls.clear()
    j.append_group([(2, payload(i, 1000)) for i in range(60)] + [(3, b"end")])  # one batch, ~62 KB
    j.sync()
    j.close()
    pending = 0  # bytes written and not yet durable
    for call, n in ops.calls:
        assert n <= 10_000
        pending = pending + n if call == "write" else 0
        assert pending <= 10_000
    assert pending == 0 and sum(n for _, n in ops.calls) == os.path.getsize(tmp_path / segment_name(1)) - 24
    assert [r.seq for r in read_records(tmp_path)] == list(range(1, 62))


# ---------------------------------------------------------------------------------------------
# F3: the lock cannot be deleted from under the exchange


def test_deleting_lock_does_not_let_a_second_process_open_the_journal(tmp_path):
    """The lock was an flock on LOCK alone: `rm LOCK` while the exchange ran let a second one
    lock a new LOCK file and append over the first one's acknowledged records."""
    j = Journal.open(tmp_path)
    j.append(3, b"first")
    j.sync()
    (tmp_path / "LOCK").unlink()
    code = ("import sys\nfrom engine.journal import Journal, JournalLockedError\n"
            "try:\n    Journal.open(sys.argv[1])\nexcept JournalLockedError as exc:\n    print(exc)\n"
            "    sys.exit(3)\n")
    other = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert other.returncode == 3, other.stderr
    assert "in use by another process" in other.stdout
    j.append(3, b"second")
    j.close()
    j = Journal.open(tmp_path)  # released at close: the next open takes it (and writes LOCK again)
    assert j.last_seq == 2 and (tmp_path / "LOCK").read_text().strip() == str(os.getpid())
    j.close()


# ---------------------------------------------------------------------------------------------
# F2: sealed segments' structure is checked at open


def segmented(directory: Path, n: int = 120) -> list[int]:
    j = Journal.open(directory, durability="none", segment_bytes=2000)
    for i in range(1, n + 1):
        j.append(3, payload(i, 100))
    j.close()
    segments = list_segments(directory)
    assert len(segments) > 4
    return segments


@pytest.mark.parametrize("how", ["truncated", "truncated-at-a-record", "missing", "extended"])
def test_a_sealed_segment_cut_short_or_missing_stops_startup(tmp_path, how):
    """The server started from a snapshot on a journal whose older segment was truncated or
    gone (never read at open), and every member replay across it then failed."""
    segments = segmented(tmp_path)
    old = tmp_path / segment_name(segments[1])
    blamed = old
    if how == "truncated":
        os.truncate(old, old.stat().st_size - 50)
    elif how == "truncated-at-a-record":
        os.truncate(old, old.stat().st_size - (17 + 100))
    elif how == "extended":
        with open(old, "ab") as f:
            f.write(b"\0" * 100)
    else:
        old.unlink()
        (tmp_path / index_name(segments[1])).unlink()
        blamed = tmp_path / segment_name(segments[0])
    with pytest.raises(CorruptJournalError, match="sealed segment") as err:
        Journal.open(tmp_path)
    assert err.value.path == str(blamed)
    verify = cli("journal", "verify", str(tmp_path))  # verify agrees
    assert verify.returncode == 1 and "CORRUPT" in verify.stderr


def test_the_open_reads_sealed_segments_tails_only(tmp_path, monkeypatch):
    """The check costs a small read per sealed segment, not a read of the journal."""
    segments = segmented(tmp_path, 400)
    reads = []
    real_pread = os.pread

    def pread(fd, n, off):
        reads.append(n)
        return real_pread(fd, n, off)

    monkeypatch.setattr(os, "pread", pread)
    Journal.open(tmp_path).close()
    monkeypatch.undo()
    assert len(reads) == len(segments) - 1 and max(reads) <= 2000


# ---------------------------------------------------------------------------------------------
# F4: a newest segment of zeros: verify says what startup does


def test_verify_reports_a_zeroed_newest_segment_as_startup_treats_it(tmp_path):
    fill(tmp_path, 10)
    (tmp_path / segment_name(11)).write_bytes(bytes(4096))
    verify = cli("journal", "verify", str(tmp_path))
    assert verify.returncode == 0, verify.stderr
    assert "10 records" in verify.stdout and "removed when the journal is next opened" in verify.stdout
    j = Journal.open(tmp_path)
    assert j.last_seq == 10 and list_segments(tmp_path) == [1]
    j.close()


# ---------------------------------------------------------------------------------------------
# F5: a damaged index is rebuilt, not only a missing one


def test_a_damaged_index_is_rebuilt_after_open(tmp_path, caplog):
    segments = segmented(tmp_path)
    damaged = tmp_path / index_name(segments[1])
    good = damaged.read_bytes()
    raw = bytearray(good)
    raw[50] ^= 0xFF  # in the body
    damaged.write_bytes(bytes(raw))
    stale = tmp_path / index_name(segments[2])
    stale.write_bytes(stale.read_bytes()[:-5])
    with caplog.at_level("WARNING", logger="kaboni.journal"):
        j = Journal.open(tmp_path)
        j.index_missing()
        j.close()  # waits for the indexer
    assert damaged.read_bytes() == good
    data = (tmp_path / segment_name(segments[2])).read_bytes()
    load_index(tmp_path, segments[2], data)  # usable again
    assert "damaged index" in caplog.text and "rebuilding it" in caplog.text


def test_a_sealed_segment_damaged_inside_is_logged_as_an_error_when_indexed(tmp_path, caplog):
    """Not read at open (see docs/journal.md for the cost); a segment without an index is walked
    after the replay, and damage found then is an ERROR, not a quiet 'not indexed'."""
    segments = segmented(tmp_path)
    old = tmp_path / segment_name(segments[1])
    (tmp_path / index_name(segments[1])).unlink()
    damage(old, 100, b"\xff")
    with caplog.at_level("WARNING", logger="kaboni.journal"):
        j = Journal.open(tmp_path)
        j.index_missing()
        j.close()
    assert any(r.levelname == "ERROR" and "is damaged" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# F7: a lost newest segment, proven by a snapshot beyond the end, is an error in the log


def test_a_snapshot_beyond_the_end_is_logged_as_an_error_naming_the_missing_seqs(tmp_path, caplog):
    """The files cannot tell a lost tail from a copy taken while the exchange ran (where such
    snapshots are expected, docs/operations.md), so the start goes on, but not with a warning
    only: the log says which confirmed seqs would be missing."""
    import engine as E
    from engine import demo_config
    from engine.journal import Ledger

    config = demo_config()
    ledger = Ledger.open(config, tmp_path, durability="none", today="2026-11-24", segment_bytes=4096,
                         snapshot_every=1_000_000)
    for i in range(60):
        ledger.execute(E.NewOrder(f"o{i}", "CEA25", "sell", 1, 9300), "M02", 1)
    ledger.close()  # snapshots at its last seq
    last = ledger.last_seq
    newest = list_segments(tmp_path)[-1]
    assert newest > 1
    (tmp_path / segment_name(newest)).unlink()
    with caplog.at_level("WARNING", logger="kaboni.journal"):
        with Ledger.open(config, tmp_path, durability="none", segment_bytes=4096) as again:
            assert again.last_seq == newest - 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any(f"records {newest} to {last}" in m and "beyond the journal's end" in m for m in errors), errors
