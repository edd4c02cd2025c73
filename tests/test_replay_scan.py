"""A member with few reports on a long journal: reading its reports costs work in proportion
to its reports, not to the journal, and a resume replay never holds the event loop for long.

The index has an entry for a report that comes INDEX_GAP bytes after the member's last entry,
reads jump between entries, and ``Ledger.report_step`` stops after reading about SCAN_BYTES
of the journal even if it found nothing (an index from before the gap entries)."""

import asyncio
import tempfile
import time
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine.journal._ledger as ledger_module
from engine import MassCancel, NewOrder
from engine.journal import INDEX_GAP, SCAN_BYTES, Ledger
from engine.journal._format import FRAME_SIZE
from gateway.client import Client

from _fakes import ThreadServer, make_config

SPARSE = "M01"  # the member with few reports
BUSY = "M09"  # everyone else: throttled orders, one small ENTRY (about 250 bytes) each


def _flood(ledger, n, ts):
    for i in range(n):
        ledger.execute(NewOrder(f"f{ts}-{i}", "CEA25", "buy", 1, 8400), BUSY, ts + i, throttled=True)
    return ts + n


def _sparse_reports(ledger, k, ts):
    """Two entries of the sparse member: one report (a throttled order), then two in one entry
    (an IOC that finds nothing: accepted and cancelled)."""
    out = []
    _, _, reports = ledger.execute(NewOrder(f"t{k}", "CEA25", "buy", 1, 8400), SPARSE, ts, throttled=True)
    out += [body for m, body in reports if m == SPARSE]
    _, _, reports = ledger.execute(NewOrder(f"i{k}", "CEA25", "buy", 1, 8400, tif="ioc"), SPARSE, ts + 1)
    out += [body for m, body in reports if m == SPARSE]
    return out


def build(directory, gaps, gap_records, segment_bytes=4 << 20, config=None):
    """A journal where SPARSE has a few reports, ``gap_records`` of BUSY's records apart;
    returns SPARSE's report bodies as execute returned them."""
    ledger = Ledger.open(config or make_config(), directory, durability="none", segment_bytes=segment_bytes)
    sent, ts = [], 1
    try:
        for k in range(gaps):
            sent += _sparse_reports(ledger, k, ts)
            ts = _flood(ledger, gap_records, ts + 2)
        sent += _sparse_reports(ledger, gaps, ts)
        ts = _flood(ledger, 100, ts + 2)
    finally:
        ledger.close()
    return sent


class Reads:
    """Counts the records (and their bytes) a ledger's reads take from its journal."""

    def __init__(self, ledger, monkeypatch):
        self.records = self.bytes = 0
        read_at = ledger.journal.read_at

        def counted(*args, **kw):
            for rec in read_at(*args, **kw):
                self.records += 1
                self.bytes += FRAME_SIZE + len(rec.payload)
                yield rec
        monkeypatch.setattr(ledger.journal, "read_at", counted)

    def take(self):
        out = self.records, self.bytes
        self.records = self.bytes = 0
        return out


def stepped(ledger, member, after, through, max_bytes, reads=None):
    """All the member's reports by ``report_step`` calls; returns (bodies, per-step reads)."""
    bodies, steps, resume = [], [], None
    while after < through:
        got, resume = ledger.report_step(member, after, through, max_bytes, resume)
        if reads is not None:
            steps.append((len(got), *reads.take()))
        bodies += got
        after += len(got)
        assert len(steps) < 10_000
    return bodies, steps


@pytest.fixture(scope="module")
def journal(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sparse")
    sent = build(directory, gaps=6, gap_records=12_000)  # about 3 MB between two of its entries
    return directory, sent


def test_the_reports_of_a_sparse_member_come_back_whole_and_in_order(journal):
    directory, sent = journal
    with Ledger.open(make_config(), directory, durability="none") as ledger:
        n = len(sent)
        assert ledger.engine.last_seq(SPARSE) == n == 21
        assert list(ledger.reports(SPARSE, 0, n)) == sent
        for a in range(n):
            for b in (a + 1, a + 2, a + 5, n):
                assert list(ledger.reports(SPARSE, a, min(b, n))) == sent[a:min(b, n)]
        for max_bytes in (1, 300, 10_000):
            assert stepped(ledger, SPARSE, 0, n, max_bytes)[0] == sent
            assert stepped(ledger, SPARSE, 7, n, max_bytes)[0] == sent[7:]
        # a resume point from another seq or member is not used
        got, resume = ledger.report_step(SPARSE, 3, n, 1)
        assert got == sent[3:4] and resume[:2] == (SPARSE, 4)
        assert ledger.report_step(SPARSE, 0, n, 1, resume)[0] == sent[:1]
        assert ledger.report_step(SPARSE, 4, n, 1, (BUSY, 4, resume[2]))[0] == sent[4:5]


def test_reading_a_sparse_members_reports_reads_in_proportion_to_its_reports(journal, monkeypatch):
    """The journal holds about 72,000 records; the member's 21 reports are read with a few
    records read per report, and no step reads more than its budget."""
    directory, sent = journal
    with Ledger.open(make_config(), directory, durability="none") as ledger:
        n = len(sent)
        list(ledger.reports(SPARSE, 0, 1))  # the replayed range's lazy index, once
        reads = Reads(ledger, monkeypatch)
        assert list(ledger.reports(SPARSE, 0, n)) == sent
        records, _ = reads.take()
        assert records <= 3 * n, records
        bodies, steps = stepped(ledger, SPARSE, 0, n, 1, reads)
        assert bodies == sent
        assert max(r for _, r, _ in steps) <= 3, steps
        # SPARSE's reports sit between the busy member's: its own reads are not slowed either
        busy = ledger.engine.last_seq(BUSY)
        reads.take()
        assert len(list(ledger.reports(BUSY, busy - 1000, busy))) == 1000
        assert reads.take()[0] < 1100


def test_an_index_without_gap_entries_is_read_in_bounded_steps(tmp_path, monkeypatch):
    """An index from before the gap entries (a snapshot written by an older version) has one
    entry every INDEX_STEP reports: a step then stops after about SCAN_BYTES of the journal,
    having found nothing maybe, and the next step reads on from where it stopped."""
    monkeypatch.setattr(ledger_module, "INDEX_GAP", 1 << 62)
    sent = build(tmp_path, gaps=3, gap_records=6_000)
    with Ledger.open(make_config(), tmp_path, durability="none") as ledger:
        assert ledger.snapshot_every == 100_000
        list(ledger.reports(SPARSE, 0, 1))
        assert list(ledger._idx_seq[SPARSE]) == [1]  # one entry: the old index
        reads = Reads(ledger, monkeypatch)
        bodies, steps = stepped(ledger, SPARSE, 0, len(sent), 10_000, reads)
        assert bodies == sent
        assert max(b for _, _, b in steps) <= SCAN_BYTES + 1024, steps
        assert sum(1 for got, _, _ in steps if not got) >= 3 * 6_000 * 240 // SCAN_BYTES - 3
        total = sum(b for _, _, b in steps)
        assert total < ledger.journal.stats.bytes + (6 << 20), total  # each stretch read about once


def test_the_index_gets_an_entry_for_a_report_far_from_the_last_one(tmp_path):
    sent = build(tmp_path, gaps=3, gap_records=3_000, segment_bytes=64 << 20)  # about 750 KB apart
    with Ledger.open(make_config(), tmp_path, durability="none") as ledger:
        assert list(ledger.reports(SPARSE, 0, len(sent))) == sent
        seqs = list(ledger._idx_seq[SPARSE])
        positions = list(ledger._idx_pos[SPARSE])
        assert seqs == [1, 4, 7, 10]  # each first report after a gap; the IOC's two share an entry
        assert all(b - a >= INDEX_GAP for a, b in zip(positions, positions[1:]))
    for snapshot in tmp_path.glob("snapshot-*.kbs"):
        snapshot.unlink()
    with Ledger.open(make_config(), tmp_path, durability="none") as ledger:  # a full replay, indexed lazily
        assert list(ledger.reports(SPARSE, 0, len(sent))) == sent
        assert (list(ledger._idx_seq[SPARSE]), list(ledger._idx_pos[SPARSE])) == (seqs, positions)


MEMBERS = ("M01", "M02", "M03")
operation = st.tuples(st.sampled_from(MEMBERS), st.sampled_from(["throttled", "ioc", "rest", "mass_cancel"]),
                      st.integers(0, 40))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, min_size=1, max_size=40), st.data())
def test_reads_with_jumps_and_budgets_give_every_report_once_in_order(operations, data):
    """Small gaps and REPORTS records (both scaled down) between the members' reports: reports,
    report_steps of any size and budget, and the lazily built index of a full replay agree with
    what execute returned."""
    with pytest.MonkeyPatch.context() as mp, tempfile.TemporaryDirectory() as directory:
        mp.setattr(ledger_module, "INDEX_GAP", 2048)
        mp.setattr(ledger_module, "REPORTS_PER_RECORD", 3)
        sent = {m: [] for m in MEMBERS}
        with Ledger.open(make_config(max_msgs_per_s=10**6), directory, durability="none",
                         segment_bytes=16 << 10) as ledger:
            for i, (member, kind, flood) in enumerate(operations):
                if kind == "mass_cancel":
                    command = MassCancel(f"m{i}")
                else:
                    command = NewOrder(f"o{i}", "CEA25", "sell", 1, 9000 + i, tif="ioc" if kind == "ioc" else "day")
                _, _, reports = ledger.execute(command, member, i, throttled=kind == "throttled")
                for m, body in reports:
                    sent[m].append(body)
                _flood(ledger, flood, 1000 * i + 1)
            ledger.journal.sync()
            check(ledger, sent, data)
        for snapshot in Path(directory).glob("snapshot-*.kbs"):
            snapshot.unlink()
        with Ledger.open(make_config(max_msgs_per_s=10**6), directory, durability="none") as ledger:
            check(ledger, sent, data)


def check(ledger, sent, data):
    for m in MEMBERS:
        n = len(sent[m])
        assert ledger.engine.last_seq(m) == n
        assert list(ledger.reports(m, 0, n)) == sent[m]
        a = data.draw(st.integers(0, n))
        b = data.draw(st.integers(a, n))
        assert list(ledger.reports(m, a, b)) == sent[m][a:b]
        max_bytes = data.draw(st.integers(1, 2000))
        budget = data.draw(st.integers(1, 5000))
        bodies, resume, after = [], None, a
        while after < n:
            got, resume = ledger.report_step(m, after, n, max_bytes, resume, budget)
            bodies += got
            after += len(got)
        assert bodies == sent[m][a:]


def test_a_member_resuming_from_0_on_a_long_journal_does_not_hold_up_other_members(tmp_path):
    """Before: each replay read every record between two of the member's reports on the event
    loop (about 0.5 s here; about 2 s per 1.3 M records), and another member's orders waited
    behind it."""
    directory = tmp_path / "data"
    directory.mkdir()
    config = make_config(max_msgs_per_s=1_000_000)
    sent = build(directory, gaps=2, gap_records=150_000, segment_bytes=64 << 20, config=config)
    n = len(sent)
    latencies, replays = [], []

    async def resume_from_0():
        c = await Client.connect("127.0.0.1", port)
        accepted = await c.logon(SPARSE, f"{SPARSE}-token", resume_from=0)
        assert accepted["next_seq"] == n + 1
        got = [await c.next_report() for _ in range(n)]
        replays.append([r["seq"] for r in got])
        await c.logout()

    async def victim(stop):
        c = await Client.connect("127.0.0.1", port)
        await c.logon("M02", "M02-token")
        i = 0
        while not stop.is_set():
            t0 = time.perf_counter()
            await c.send(NewOrder(f"v{i}", "CEA25", "buy", 1, 8400, tif="ioc"))
            assert (await c.next_report())["type"] == "OrderAccepted"
            latencies.append(time.perf_counter() - t0)
            assert (await c.next_report())["type"] == "OrderCancelled"
            i += 1
            await asyncio.sleep(0.005)
        await c.logout()

    async def main():
        stop = asyncio.Event()
        v = asyncio.create_task(victim(stop))
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3:
            await asyncio.gather(*(resume_from_0() for _ in range(4)))
        stop.set()
        await v

    with ThreadServer(config, directory) as server:
        port = server.port
        asyncio.run(asyncio.wait_for(main(), 60))
    assert replays and all(r == list(range(1, n + 1)) for r in replays)
    assert len(latencies) > 50
    # every replay read the 300,000 records between its reports before: 0.5 s and more each
    assert max(latencies) < 0.25, (max(latencies), sorted(latencies)[len(latencies) // 2], len(replays))


def test_a_paced_replay_of_one_huge_command_reads_and_decodes_each_record_about_once(tmp_path, monkeypatch):
    """A mass cancel of 30,000 orders: its reports take two records of up to 20,000 (about 3 MB
    each). Each 1,024-report step read such a record again in 16 KiB pieces, copying it each
    time, and decoded its 20,000 rows again: steps of 30 ms near the end of a 200k cancel."""
    import os

    import engine.journal._log as log_module

    n = 30_000
    with Ledger.open(make_config(), tmp_path, today="2026-11-24", durability="none") as ledger:
        for i in range(n):
            ledger.execute(NewOrder(f"r{i}", "CEA25", "sell", 1, 9300 + i % 200, tif="gtc"), "M08", i)
        ledger.execute(MassCancel("mc", "CEA25"), "M08", n)
        ledger.journal.sync()
        last = ledger.engine.last_seq("M08")
        reads, decodes = [], []
        real_pread, real_rows = os.pread, ledger_module._report_rows
        monkeypatch.setattr(log_module.os, "pread", lambda *a: reads.append(a[1]) or real_pread(*a))
        monkeypatch.setattr(ledger_module, "_report_rows", lambda rec: decodes.append(1) or real_rows(rec))
        after, mark, got = n, None, []
        while after < last:
            bodies, mark = ledger.report_step("M08", after, min(last, after + 1024), 2 << 20, mark)
            got += bodies
            after += len(bodies)
        seqs = [msgspec.msgpack.decode(b)["seq"] for b in got]
        assert seqs == list(range(n + 1, last + 1))  # every cancel and the MassCancelDone, in order
        steps = -(-(last - n) // 1024)
        assert len(decodes) <= 2 * 2 + steps  # each big record about once (not once per step)
        assert sum(reads) <= 2 * steps * 3 * (1 << 20)  # a big record read whole, not piecewise copied
        assert len(reads) <= 4 * steps
