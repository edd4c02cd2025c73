"""The Ledger: engine + journal. Creation, reports as journaled bytes, the per-member report
index, restarts with and without snapshots, and (hypothesis) snapshot + replay == full replay."""

from __future__ import annotations

import json
import os
import random
import tempfile
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    Balances, CancelOrder, CloseMarket, DayEnded, Deposit, EndOfDay, Halt, MassCancel,
    Engine, NewOrder, OpenMarket, QueryBalances, ReinstateMember, ReplaceOrder, Restarted, Resume, SuspendMember,
    Withdraw, demo_config, parse_config, DEMO_TOML,
)
from engine.journal import KIND_ENTRY, KIND_FILL, FillRecord, Ledger, read_records
from engine.journal._snapshot import list_snapshots, snapshot_name

pytestmark = pytest.mark.timeout(120)

DAY = "2026-11-24"
MEMBERS = [f"M{i:02d}" for i in range(1, 7)]


def random_commands(rng: random.Random, n: int, prefix: str = "c"):
    """(command, member, session) triples: mostly orders, some cancels, replaces and admin."""
    live: dict[str, list[str]] = {m: [] for m in MEMBERS}
    out = []
    for i in range(n):
        m = rng.choice(MEMBERS)
        cl = f"{prefix}{i}"
        r = rng.random()
        if r < 0.65:
            ins = rng.choice(["CEA24", "CEA25", "EUA"])
            if ins == "EUA":
                cmd = NewOrder(cl, ins, rng.choice(["buy", "sell"]), 1000 * rng.randint(1, 5), rng.randint(6900, 7100))
            else:
                ref = 9200 if ins == "CEA24" else 9250
                cmd = NewOrder(cl, ins, rng.choice(["buy", "sell"]), rng.randint(1, 30), ref + rng.randint(-15, 15),
                               rng.choice(["day", "gtc", "ioc", "fok"]))
            live[m].append(cl)
        elif r < 0.8 and live[m]:
            cmd = CancelOrder(cl, rng.choice(live[m]))
        elif r < 0.92 and live[m]:
            cmd = ReplaceOrder(cl, rng.choice(live[m]), rng.randint(1, 30), 9250 + rng.randint(-15, 15))
            live[m].append(cl)
        elif r < 0.94:
            cmd = MassCancel(cl)
        elif r < 0.95:
            cmd, m = QueryBalances(), m
        else:
            cmd, m = NewOrder(cl, "CEA25", rng.choice(["buy", "sell"]), rng.randint(1, 10), None), m
        out.append((cmd, m, rng.choice([0, 0, 0, 7])))
    return out


def run(ledger: Ledger, commands, ts0: int = 1_000):
    outputs = []
    for k, (cmd, m, session) in enumerate(commands):
        outputs.append(ledger.execute(cmd, m, ts0 + k, session))
    return outputs


def test_new_journal_is_funded_and_opened(tmp_path):
    cfg = demo_config()
    with Ledger.open(cfg, tmp_path, today=DAY, durability="none") as ledger:
        assert not ledger.recovered
        assert ledger.engine.trading_day == DAY
        assert ledger.engine.balances("M07").cash["CNY"].total == cfg.initial_cash
        assert ledger.engine.balances("M07").allowances["EUA"].settled == cfg.initial_allowances
        assert ledger.engine.status("CEA25") == "open"
        assert ledger.durable_seq == ledger.last_seq  # the set-up is durable before open returns
        seq0 = ledger.last_seq
        seq, events, reports = ledger.execute(QueryBalances(), "M01", 5)
        assert seq == seq0 and isinstance(events[0], Balances) and reports == []
        assert ledger.last_seq == seq0  # not journaled
    with Ledger.open(cfg, tmp_path, durability="none") as ledger:
        assert ledger.recovered and ledger.last_seq == seq0
        # a repeated open does not fund twice
        assert ledger.engine.balances("M07").cash["CNY"].total == cfg.initial_cash


def test_new_journal_needs_a_trading_day(tmp_path):
    with pytest.raises(ValueError, match="trading day"):
        Ledger.open(demo_config(), tmp_path)
    cfg = parse_config(DEMO_TOML + '\n', "x")
    cfg = msgspec.structs.replace(cfg, market=msgspec.structs.replace(cfg.market, first_trading_day="2026-01-05"))
    with Ledger.open(cfg, tmp_path / "b", today=DAY, durability="none") as ledger:
        assert ledger.engine.trading_day == "2026-01-05"


def test_execute_journals_fills_then_entry_with_exact_report_bytes(tmp_path):
    with Ledger.open(demo_config(), tmp_path, today=DAY) as ledger:
        ledger.execute(NewOrder("s1", "CEA25", "sell", 10, 9250), "M02", 100)
        ledger.execute(NewOrder("s2", "CEA25", "sell", 10, 9251), "M03", 101)
        seq, events, reports = ledger.execute(NewOrder("b1", "CEA25", "buy", 15, 9251), "M01", 102)
        ledger.journal.sync()
        assert ledger.durable_seq >= seq
        assert [m for m, _ in reports] == ["M01", "M01", "M02", "M01", "M03"]
        assert reports[0][1] == msgspec.msgpack.encode(events[0])
        recs = [r for r in read_records(tmp_path) if r.seq > seq - 3]
        assert [r.kind for r in recs] == [KIND_FILL, KIND_FILL, KIND_ENTRY]
        assert [r.group_end for r in recs] == [False, False, True]
        f1, f2 = (msgspec.msgpack.decode(r.payload, type=FillRecord) for r in recs[:2])
        assert (f1.buyer, f1.seller, f1.price, f1.qty, f1.currency, f1.trading_day) == ("M01", "M02", 9250, 10, "CNY", DAY)
        assert (f2.buyer, f2.seller, f2.price, f2.qty, f2.aggressor) == ("M01", "M03", 9251, 5, "buy")
        entry = msgspec.msgpack.decode(recs[2].payload)
        assert [tuple(r) for r in entry[5]] == [(m, msgspec.msgpack.decode(b)["seq"], b) for m, b in reports]


def test_reports_from_the_index_match_what_execute_returned(tmp_path):
    rng = random.Random(7)
    commands = random_commands(rng, 2500)
    sent: dict[str, list[bytes]] = {m: [] for m in MEMBERS}
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=700,
                     segment_bytes=64 << 10) as ledger:
        for _, _, reports in run(ledger, commands):
            for m, body in reports:
                sent[m].append(body)
        ledger.journal.sync()

        def check(lg):
            for m in MEMBERS:
                last = lg.engine.last_seq(m)
                assert last == len(sent[m])
                assert list(lg.reports(m, 0, last)) == sent[m]
                for _ in range(15):
                    a = rng.randint(0, last)
                    b = rng.randint(a, last)
                    assert list(lg.reports(m, a, b)) == sent[m][a:b]
            assert list(lg.reports("M20", 0, 5)) == []

        check(ledger)
    assert len(list_snapshots(tmp_path)) == 2
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:  # from a snapshot
        check(ledger)
    for seq in list_snapshots(tmp_path):
        os.unlink(tmp_path / snapshot_name(seq))
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:  # full replay
        check(ledger)
    # a crash (no snapshot at close), a restart from the older snapshot, more trading before
    # the first resume: the index joins snapshot, replayed and live entries
    with Ledger.open(demo_config(), tmp_path, durability="none", snapshot_every=900) as ledger:
        for part in range(2):
            for _, _, reports in run(ledger, random_commands(rng, 1000, f"x{part}-")):
                for m, body in reports:
                    sent[m].append(body)
        ledger.journal.sync()
        ledger.wait_snapshots()
    snaps = list_snapshots(tmp_path)
    os.unlink(tmp_path / snapshot_name(snaps[0]))  # as if the process died before its last snapshot
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        for _, _, reports in run(ledger, random_commands(rng, 700, "y")):
            for m, body in reports:
                sent[m].append(body)
        ledger.journal.sync()
        check(ledger)


def test_restart_hash_equals_full_replay_and_end_of_day_snapshots(tmp_path):
    rng = random.Random(3)
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=10**9) as ledger:
        run(ledger, random_commands(rng, 400, "a"))
        ledger.execute(CloseMarket(), "ops", 9_000)
        seq, events, _ = ledger.execute(EndOfDay(), "ops", 9_001)
        assert any(isinstance(e, DayEnded) for e in events)
        ledger.wait_snapshots()
        ledger.execute(OpenMarket(), "ops", 9_002)
        run(ledger, random_commands(rng, 300, "b"), 10_000)
        live_hash = ledger.engine.state_hash()
        # a crash now: the newest snapshot is the end-of-day one
        ledger.journal.sync()
        snaps_before_close = list_snapshots(tmp_path)
    assert seq in snaps_before_close
    for s in list_snapshots(tmp_path):
        if s != seq:
            os.unlink(tmp_path / snapshot_name(s))
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        assert ledger.engine.trading_day == "2026-11-25"
        assert ledger.engine.state_hash() == live_hash
        ledger.engine.check()


def test_full_replay_over_segments_equals_live_state_and_stops_at_a_damaged_fill(tmp_path):
    from engine.journal import CorruptJournalError, list_segments
    from engine.journal._format import FRAME_SIZE, segment_name, unpack_position
    from engine.journal._index import index_name
    rng = random.Random(11)
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=10**9,
                     segment_bytes=16 << 10) as ledger:
        run(ledger, random_commands(rng, 600))
        live_hash = ledger.engine.state_hash()
    segments = list_segments(tmp_path)
    assert len(segments) > 3
    # every sealed segment got its frame index in the background; the newest has none
    indexes = [tmp_path / index_name(s) for s in segments]
    assert all(p.exists() for p in indexes[:-1]) and not indexes[-1].exists()
    for s in list_snapshots(tmp_path):
        os.unlink(tmp_path / snapshot_name(s))
    with Ledger.open(demo_config(), tmp_path, durability="none", segment_bytes=16 << 10) as ledger:
        assert ledger.recovered and ledger.engine.state_hash() == live_hash   # through the indexes
    for p in indexes[:-1]:
        p.unlink()
    for s in list_snapshots(tmp_path):
        os.unlink(tmp_path / snapshot_name(s))
    with Ledger.open(demo_config(), tmp_path, durability="none", segment_bytes=16 << 10) as ledger:
        assert ledger.engine.state_hash() == live_hash                        # walking every frame
    assert all(p.exists() for p in indexes[:-1])  # indexed again after that replay
    for s in list_snapshots(tmp_path):
        os.unlink(tmp_path / snapshot_name(s))
    # a flipped byte in a FILL of an older segment: replay skips FILLs but still checks them
    fill = next(r for r in read_records(tmp_path) if r.kind == KIND_FILL and unpack_position(r.position)[0] == segments[1])
    first, off = unpack_position(fill.position)
    path = tmp_path / segment_name(first)
    data = bytearray(path.read_bytes())
    data[off + FRAME_SIZE + 3] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptJournalError) as info:
        Ledger.open(demo_config(), tmp_path, durability="none", segment_bytes=16 << 10)
    assert (info.value.path, info.value.offset) == (str(path), off)


def test_a_journal_of_only_its_start_record_restarts_without_warnings(tmp_path, caplog):
    """No initial funding and closed on start (a production set-up): no snapshot is written
    for the START record alone, so restarts have no unusable snapshot to warn about."""
    cfg = msgspec.structs.replace(demo_config(), initial_cash=0, initial_allowances=0, open_on_start=False)
    for _ in range(2):
        with Ledger.open(cfg, tmp_path, today=DAY, durability="none") as ledger:
            assert ledger.last_seq == 1
    assert list_snapshots(tmp_path) == []
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_a_changed_configuration_is_reported_on_every_restart(tmp_path, caplog):
    cfg = demo_config()
    with Ledger.open(cfg, tmp_path, today=DAY, durability="none") as ledger:
        run(ledger, random_commands(random.Random(3), 50))
    assert list_snapshots(tmp_path)  # the restart below starts from a snapshot
    with Ledger.open(cfg, tmp_path, durability="none"):
        pass
    assert "configuration differs" not in caplog.text
    gateway_only = msgspec.structs.replace(cfg, gateway=msgspec.structs.replace(cfg.gateway, max_msgs_per_s=5))
    with Ledger.open(gateway_only, tmp_path, durability="none"):
        pass  # gateway settings do not decide replay
    assert "configuration differs" not in caplog.text
    changed = msgspec.structs.replace(cfg, instruments=[msgspec.structs.replace(cfg.instruments[0], fee_bp=5),
                                                        *cfg.instruments[1:]])
    bigger = msgspec.structs.replace(cfg, instruments=[*cfg.instruments, msgspec.structs.replace(
        cfg.instruments[0], symbol="CEA26")])
    for other, what in ((changed, "instrument or member settings"), (bigger, "added CEA26")):
        caplog.clear()
        with Ledger.open(other, tmp_path, durability="none"):
            pass
        assert "configuration differs from the one this journal was started with: " + what in caplog.text


def test_a_snapshot_that_fails_to_write_leaves_the_snapshot_thread_working(tmp_path, monkeypatch, caplog):
    import engine.journal._ledger as ledger_module

    real_write = ledger_module.write_snapshot
    calls = []

    def write_once_badly(directory, body, sync):
        calls.append(body.seq)
        if len(calls) == 1:
            raise TypeError("a bug in the writer (injected)")
        return real_write(directory, body, sync)
    monkeypatch.setattr(ledger_module, "write_snapshot", write_once_badly)
    ledger = Ledger.open(demo_config(), tmp_path, today=DAY)
    ledger.execute(NewOrder("a", "CEA25", "buy", 1, 9250), "M01", 1)
    ledger.snapshot()
    ledger.wait_snapshots()
    assert "injected" in caplog.text and list_snapshots(tmp_path) == []
    ledger.execute(NewOrder("b", "CEA25", "buy", 1, 9250), "M01", 2)
    ledger.snapshot()
    ledger.wait_snapshots()  # returned: the thread took the second one
    assert list_snapshots(tmp_path) == [ledger.last_seq]
    ledger.close()


def test_damaged_snapshot_falls_back_to_an_older_one(tmp_path):
    rng = random.Random(5)
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=300) as ledger:
        run(ledger, random_commands(rng, 800))
        live_hash = ledger.engine.state_hash()
    newest = list_snapshots(tmp_path)[0]
    path = tmp_path / snapshot_name(newest)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        assert ledger.engine.state_hash() == live_hash


def test_journal_failure_surfaces_through_on_error(tmp_path):
    from engine.journal import FileOps, JournalFailedError

    class FailingOps(FileOps):
        fail = False

        def write(self, fd, data):
            if self.fail:
                raise OSError(28, "No space left on device (injected)")
            return super().write(fd, data)

    ops = FailingOps()
    errors, durable = [], []
    ledger = Ledger.open(demo_config(), tmp_path, today=DAY, on_error=errors.append, on_durable=durable.append,
                         file_ops=ops)
    ledger.execute(NewOrder("a", "CEA25", "buy", 1, 9250), "M01", 1)
    ledger.journal.sync()
    ops.fail = True
    seq, _, _ = ledger.execute(NewOrder("b", "CEA25", "buy", 1, 9250), "M01", 2)
    assert not ledger.journal.wait_durable(seq, timeout=5)
    assert len(errors) == 1 and "No space" in str(errors[0])
    assert max(durable) < seq
    with pytest.raises(JournalFailedError):
        ledger.execute(NewOrder("c", "CEA25", "buy", 1, 9250), "M01", 3)
    ledger.close()


def test_a_command_the_journal_refuses_stops_the_ledger_before_anything_else_runs(tmp_path):
    """The engine runs a command before its entry is appended; if the append fails (an entry
    too large, an encoding error), the engine is ahead of its journal. Nothing more may run:
    later reports would carry seqs the journal never gives back."""
    from engine.journal import JournalFailedError

    errors = []
    ledger = Ledger.open(demo_config(), tmp_path, today=DAY, on_error=errors.append)
    ledger.execute(NewOrder("a", "CEA25", "buy", 1, 9250), "M01", 1)
    ledger.journal.sync()
    before = ledger.engine.state_hash()
    journal_append = ledger.journal.append

    def refuse(kind, payload):
        raise ValueError("a record of 70000000 bytes: refused (injected)")
    ledger.journal.append = refuse
    with pytest.raises(ValueError, match="injected"):
        ledger.execute(NewOrder("b", "CEA25", "buy", 1, 9250), "M01", 2)
    ledger.journal.append = journal_append
    assert len(errors) == 1 and "injected" in str(errors[0])
    ahead = ledger.engine.state_hash()
    assert ahead != before  # the engine took order "b"; the journal does not have it
    with pytest.raises(JournalFailedError):
        ledger.execute(NewOrder("c", "CEA25", "buy", 1, 9250), "M01", 3)
    assert ledger.engine.state_hash() == ahead  # "c" never reached the engine
    ledger.close()
    again = Ledger.open(demo_config(), tmp_path, today=DAY)
    assert again.engine.state_hash() == before  # recovered from what the journal holds
    again.close()


def test_the_report_index_holds_positions_of_segments_past_seq_2_to_the_31(tmp_path):
    """A position is (segment's first seq << 32 | offset): past 2^31 records it no longer fits
    an int64. The index keeps positions unsigned, and a snapshot carries them through."""
    from engine.journal._format import pack_position
    from engine.journal._snapshot import SnapshotBody

    ledger = Ledger.open(demo_config(), tmp_path, today=DAY)
    far = pack_position(2**32 - 1, 2**31)
    ledger._ensure_index()
    ledger._index([("M01", 10**9, b"")], far)
    body = ledger._snapshot_body()
    restored = msgspec.msgpack.decode(msgspec.msgpack.encode(body), type=SnapshotBody)
    seqs, positions = restored.index["M01"]
    assert far in memoryview(positions).cast("Q").tolist()
    ledger.close()


# ---------------------------------------------------------------------------------------------
# Hypothesis: snapshot + replay == full replay == the live engine

command_strategy = st.lists(
    st.tuples(
        st.sampled_from(["buy", "sell", "cancel", "replace", "mass", "halt", "resume", "eod", "suspend", "deposit"]),
        st.sampled_from(MEMBERS[:4]),
        st.sampled_from(["CEA25", "CEA24"]),
        st.integers(1, 40),
        st.integers(-12, 12),
        st.sampled_from(["day", "gtc", "ioc", "fok"]),
        st.integers(0, 30),
    ),
    min_size=1, max_size=120,
)


def build(ops):
    out = []
    for i, (kind, m, ins, qty, dp, tif, ref) in enumerate(ops):
        cl = f"h{i}"
        if kind in ("buy", "sell"):
            out.append((NewOrder(cl, ins, kind, qty, 9250 + dp, tif), m))
        elif kind == "cancel":
            out.append((CancelOrder(cl, f"h{ref}"), m))
        elif kind == "replace":
            out.append((ReplaceOrder(cl, f"h{ref}", qty, 9250 + dp), m))
        elif kind == "mass":
            out.append((MassCancel(cl, ins), m))
        elif kind == "halt":
            out.append((Halt(ins, bool(qty % 2)), "ops"))
        elif kind == "resume":
            out.append((Resume(ins), "ops"))
        elif kind == "eod":
            out += [(CloseMarket(), "ops"), (EndOfDay(), "ops"), (OpenMarket(), "ops")]
        elif kind == "suspend":
            out.append((SuspendMember(m) if qty % 2 else ReinstateMember(m), "ops"))
        else:
            out.append((Deposit(f"d{i}", m, "CNY", qty) if dp > 0 else Withdraw(f"w{i}", m, ins, qty), "ops"))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(command_strategy, st.data())
def test_snapshot_plus_replay_equals_full_replay(ops, data):
    import engine.journal._ledger as ledger_module

    commands = build(ops)
    cut = data.draw(st.integers(0, len(commands)), label="snapshot after")
    # 2: most commands' reports spread over REPORTS records too
    per_record = data.draw(st.sampled_from([ledger_module.REPORTS_PER_RECORD, 2]), label="reports per record")
    saved = ledger_module.REPORTS_PER_RECORD
    ledger_module.REPORTS_PER_RECORD = per_record
    try:
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            with Ledger.open(demo_config(), d, today=DAY, durability="none", snapshot_every=10**9) as ledger:
                setup = [(Deposit(f"i-{x}-{a}", x, a, 10**7), "ops") for x in MEMBERS[:4]
                         for a in ("CNY", "CEA24", "CEA25")]
                for k, (cmd, m) in enumerate(setup + commands):
                    ledger.execute(cmd, m, k)
                    if k == len(setup) + cut - 1:
                        ledger.snapshot()
                live = ledger.engine.state_hash()
                ledger.journal.sync()
                sent = {m: list(ledger.reports(m, 0, ledger.engine.last_seq(m))) for m in MEMBERS}
                assert all(len(sent[m]) == ledger.engine.last_seq(m) for m in MEMBERS)  # gap-free, all found
            # keep only the snapshot taken at the cut (close() wrote one at the end)
            kept = sorted(list_snapshots(d))
            for s in kept[1:] if len(kept) > 1 else []:
                os.unlink(d / snapshot_name(s))
            with Ledger.open(demo_config(), d, durability="none") as restored:
                snap_hash = restored.engine.state_hash()
                assert {m: list(restored.reports(m, 0, restored.engine.last_seq(m))) for m in MEMBERS} == sent
            for s in list_snapshots(d):
                os.unlink(d / snapshot_name(s))
            with Ledger.open(demo_config(), d, durability="none") as replayed:
                full_hash = replayed.engine.state_hash()
                assert {m: list(replayed.reports(m, 0, replayed.engine.last_seq(m))) for m in MEMBERS} == sent
    finally:
        ledger_module.REPORTS_PER_RECORD = saved
    assert snap_hash == full_hash == live


def test_replay_rebuilds_every_command_class_exactly():
    """Replay decodes commands into unconstrained twins and rebuilds them: every class, every
    field (defaults and non-defaults) must come back equal and of its own class."""
    import typing

    import engine._messages as M
    from engine.journal._ledger import _REPLAY_CLASS, _entry_decoder

    samples = [
        NewOrder("c1", "CEA25", "buy", 7, 9250), NewOrder("c2", "EUA", "sell", 1000, None, "ioc", "cancel_both"),
        CancelOrder("c3", "c1"), ReplaceOrder("c4", "c1", 3, 9251), MassCancel("c5"),
        MassCancel("c6", "CEA25", "sell"), QueryBalances(), Halt("CEA25"), Halt("EUA", True), Resume("CEA25"),
        OpenMarket(), CloseMarket(), EndOfDay(), SuspendMember("M01"), ReinstateMember("M01"),
        Deposit("d1", "M01", "CNY", 5), Withdraw("w1", "M02", "CEA25", 9), M.SessionEnded(42), M.Restarted(),
    ]
    assert {type(c) for c in samples} == set(typing.get_args(M.Command)) == set(_REPLAY_CLASS.values())
    encode = msgspec.msgpack.encode
    for command in samples:
        ts, member, session, throttled, twin, _ = _entry_decoder.decode(
            encode((5, "M03", 7, True, command, [("M03", 1, b"\x80")])))
        rebuilt = _REPLAY_CLASS[type(twin)](*msgspec.structs.astuple(twin))
        assert type(rebuilt) is type(command) and rebuilt == command
        assert (ts, member, session, throttled) == (5, "M03", 7, True)


def test_replay_decodes_configured_names_as_the_configurations_own_strings():
    """The replay's decoder returns the configuration's member and instrument strings (so the
    engine's lookups are identity hits); an entry naming anything else takes the fallback."""
    from engine.journal._ledger import _replay_types

    symbol, member = "".join(["CEA", "25"]), "".join(["M", "03"])  # not the literals below
    # uncached: equal names cached by another caller would be other string objects
    types = _replay_types.__wrapped__((symbol, "CEA24"), ("", member))
    encode = msgspec.msgpack.encode
    known = encode((5, "M03", 0, False, NewOrder("c1", "CEA25", "buy", 7, 9250), []))
    _, decoded_member, _, _, command, _ = types.decode(known)
    assert decoded_member is member and command.instrument is symbol
    assert type(command) is types.new_order and isinstance(command, NewOrder)
    for other in (encode((5, "M03", 0, False, NewOrder("c2", "EUA", "buy", 7, 9250), [])),
                  encode((5, "M99", 0, False, NewOrder("c3", "CEA25", "buy", 7, 9250), []))):
        with pytest.raises(msgspec.ValidationError):
            types.decode(other)
        command = types.fallback(other)[4]
        rebuilt = types.classes[type(command)](*msgspec.structs.astuple(command))
        assert type(rebuilt) is NewOrder and rebuilt.cl_ord_id in ("c2", "c3")


def test_full_replay_with_names_the_configuration_does_not_list(tmp_path):
    """Rejected orders for unknown instruments are journaled like any command; a full replay
    decodes them with the fallback and reaches the same state."""
    config = demo_config()
    with Ledger.open(config, tmp_path, today=DAY, durability="none") as ledger:
        for i, instrument in enumerate(["CEA25", "NOPE", "CEA25", "cea25", "CEA24"]):
            _, events, _ = ledger.execute(NewOrder(f"u{i}", instrument, "buy" if i % 2 else "sell", 1, 9250),
                                          "M01" if i % 2 else "M02", i)
            if instrument in ("NOPE", "cea25"):
                assert events[0].reason == "unknown_instrument"
        live = ledger.engine.state_hash()
    for s in list_snapshots(tmp_path):
        os.unlink(tmp_path / snapshot_name(s))
    with Ledger.open(config, tmp_path, durability="none") as replayed:
        assert replayed.engine.state_hash() == live
        # the rejected order's id was used up in the replay too
        _, events, _ = replayed.execute(NewOrder("u1", "CEA25", "buy", 1, 9250), "M01", 9)
        assert events[0].reason == "duplicate_cl_ord_id"


def test_a_snapshot_of_another_journal_is_refused_and_verify_says_so(tmp_path, caplog, capsys):
    """Two exchanges' journals can hold an ENTRY at the same seq and position; a snapshot copied
    from one into the other (a backup restored into the wrong directory) must not restore the
    other's state: it is tied to the payload of its entry."""
    from gateway.cli import main

    hashes = {}
    for name, seed in (("a", 1), ("b", 2)):
        with Ledger.open(demo_config(), tmp_path / name, today=DAY, durability="none", snapshot_every=10**9) as ledger:
            for i in range(40):  # the same shape (one entry per command, no fills): the same positions
                ledger.execute(NewOrder(f"o{i}", "CEA25", "buy", 1 + (i * seed) % 7, 9000), "M01", 1_000 + i * seed)
            hashes[name] = ledger.engine.state_hash()
    snap_a = list_snapshots(tmp_path / "a")[0]
    assert list_snapshots(tmp_path / "b")[0] == snap_a  # the close-time snapshots: same seq
    (tmp_path / "b" / snapshot_name(snap_a)).write_bytes((tmp_path / "a" / snapshot_name(snap_a)).read_bytes())
    assert main(["journal", "verify", str(tmp_path / "b")]) == 1
    assert f"snapshot at seq {snap_a}: NOT OF THIS JOURNAL" in capsys.readouterr().err
    assert main(["journal", "verify", str(tmp_path / "a")]) == 0
    with Ledger.open(demo_config(), tmp_path / "b", durability="none") as ledger:
        assert ledger.engine.state_hash() == hashes["b"]  # replayed in full, not a's state
    assert any("is not the one it was taken after" in r.getMessage() for r in caplog.records)


def test_a_command_with_more_reports_than_one_record_holds_spreads_them_over_reports_records(tmp_path, monkeypatch,
                                                                                           capsys):
    """An end of day expiring a million DAY orders has more reports than MAX_PAYLOAD holds: the
    ones beyond REPORTS_PER_RECORD go into REPORTS records before the ENTRY, in the same group.
    Replays to members, the lazy index after a restart and the state all see them as one."""
    import engine.journal._ledger as ledger_module
    from engine.journal import KIND_REPORTS
    from gateway.cli import main

    monkeypatch.setattr(ledger_module, "REPORTS_PER_RECORD", 7)
    sent: dict[str, list[bytes]] = {}
    with Ledger.open(demo_config(), tmp_path, today=DAY, durability="none", snapshot_every=10**9) as ledger:
        for i in range(30):
            for m in ("M01", "M02"):
                _, _, reports = ledger.execute(NewOrder(f"{m}-{i}", "CEA25", "buy", 1, 9000 - i), m, 1_000 + i)
                sent.setdefault(m, []).extend(body for _, body in reports)
        ledger.execute(CloseMarket(), "ops", 2_000)
        _, events, reports = ledger.execute(EndOfDay(), "ops", 2_001)  # 60 expiries: 8 REPORTS records + ENTRY
        for m, body in reports:
            sent[m].append(body)
        ledger.execute(OpenMarket(), "ops", 2_002)
        _, _, reports = ledger.execute(NewOrder("after", "CEA25", "buy", 1, 9000), "M01", 2_003)
        sent["M01"].extend(body for _, body in reports)
        ledger.journal.sync()
        for m in ("M01", "M02"):
            assert list(ledger.reports(m, 0, len(sent[m]))) == sent[m]
            assert list(ledger.reports(m, 25, 40)) == sent[m][25:40]  # from inside the chunks
        live_hash = ledger.engine.state_hash()
    records = list(read_records(tmp_path))
    chunks = [r for r in records if r.kind == KIND_REPORTS]
    assert len(chunks) == 8 and not any(r.group_end for r in chunks)
    entry = next(r for r in records if r.seq == chunks[-1].seq + 1)
    assert entry.kind == KIND_ENTRY and entry.group_end
    # after a restart: replayed (without a snapshot of the day's end, see snapshot_every) and
    # indexed lazily from the records themselves
    for name in list_snapshots(tmp_path):
        (tmp_path / snapshot_name(name)).unlink()
    with Ledger.open(demo_config(), tmp_path, durability="none") as ledger:
        assert ledger.engine.state_hash() == live_hash
        for m in ("M01", "M02"):
            assert list(ledger.reports(m, 0, len(sent[m]))) == sent[m]
            assert list(ledger.reports(m, 29, 35)) == sent[m][29:35]
    assert main(["journal", "dump", str(tmp_path), "--kind", "REPORTS", "--limit", "1"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["kind"] == "REPORTS" and len(line["reports"]) == 7
    assert line["reports"][0]["body"]["type"] == "OrderCancelled" and line["reports"][0]["body"]["reason"] == "expired"


def test_a_million_report_end_of_day_fits_the_journal(tmp_path):
    """The real sizes: REPORTS_PER_RECORD expiries make one record well under MAX_PAYLOAD."""
    from engine import OrderCancelled
    from engine.journal._format import MAX_PAYLOAD
    from engine.journal._ledger import REPORTS_PER_RECORD

    body = msgspec.msgpack.encode(OrderCancelled(2**62, 2**62, "M" * 32, "x" * 32, 2**62, "x" * 32, 2**62, 0,
                                                 "mass_cancel"))
    rows = [("M" * 32, 2**62, body)] * REPORTS_PER_RECORD
    assert len(msgspec.msgpack.encode(rows)) < MAX_PAYLOAD // 4


def _without(config, symbol=None, member=None):
    return msgspec.structs.replace(
        config, instruments=[i for i in config.instruments if i.symbol != symbol],
        members=[m for m in config.members if m.id != member])


def test_a_configuration_that_leaves_out_an_instrument_or_member_with_history_is_refused(tmp_path):
    """Replaying under such a file would drop that instrument's or member's orders, trades and
    balances from the state without a word (the commands naming them are rejected)."""
    from engine.journal import JournalError

    full = demo_config()
    with Ledger.open(full, tmp_path, today=DAY, durability="none") as ledger:
        ledger.execute(NewOrder("a", "CEA21", "buy", 1, 9000), "M01", 1)
    for key, name in (("symbol", "CEA21"), ("member", "M07")):  # listed in START, funded
        with pytest.raises(JournalError, match=f"leaves out {name}, which it was started with"):
            Ledger.open(_without(full, **{key: name}), tmp_path, durability="none")
    with Ledger.open(full, tmp_path, durability="none") as ledger:  # nothing was changed by the refusals
        assert [o.cl_ord_id for o in ledger.engine.live_orders("M01")] == ["a"]


def test_one_added_after_the_start_is_caught_by_the_snapshot_and_an_unused_one_may_go(tmp_path):
    from engine.journal import JournalError

    full = demo_config()
    small = _without(_without(full, symbol="EUA"), member="M20")
    with Ledger.open(small, tmp_path, today=DAY, durability="none") as ledger:  # START lists neither
        ledger.execute(NewOrder("a", "CEA25", "buy", 1, 9000), "M01", 1)
    with Ledger.open(full, tmp_path, durability="none") as ledger:  # both added
        ledger.execute(Deposit("d1", "M20", "CNY", 10**6), "ops", 2)
    with pytest.raises(JournalError, match=r"leaves out M20, which the snapshot at seq \d+ holds"):
        Ledger.open(small, tmp_path, durability="none")
    # EUA was added but never opened nor held: leaving it out again loses nothing
    with Ledger.open(_without(full, symbol="EUA"), tmp_path, durability="none") as ledger:
        assert ledger.engine.balances("M20").cash["CNY"].total == 10**6


def _crash_after(tmp_path, before: list[int]) -> None:
    """As if the process had been killed: the snapshots written since ``before`` are gone."""
    for s in list_snapshots(tmp_path):
        if s not in before:
            os.unlink(tmp_path / snapshot_name(s))


def _restarted(config):
    return Restarted([i.symbol for i in config.instruments], [m.id for m in config.members])


def test_one_added_and_used_after_the_newest_snapshot_cannot_be_left_out_after_a_crash(tmp_path):
    """Neither START nor any snapshot knew M20 and EUA; the crash came before the next
    snapshot. The start that added them journaled ``Restarted`` with the configuration's names,
    so replaying it under a file without them is refused, not run with their deposit and order
    silently gone (and the loss made permanent by the next snapshot)."""
    from engine.journal import JournalError

    full = demo_config()
    small = _without(_without(full, symbol="EUA"), member="M20")
    with Ledger.open(small, tmp_path, today=DAY, durability="none"):
        pass
    kept = list_snapshots(tmp_path)
    with Ledger.open(full, tmp_path, durability="none") as ledger:
        ledger.execute(_restarted(full), "", 1)  # as the gateway does at every restart
        ledger.execute(Deposit("d20", "M20", "CNY", 10**6), "ops", 2)
        ledger.execute(Deposit("d21", "M01", "EUR", 10**8), "ops", 3)
        ledger.execute(OpenMarket(), "ops", 4)
        ledger.execute(NewOrder("e", "EUA", "buy", 1000, 7000), "M01", 5)
    _crash_after(tmp_path, kept)
    for config, name in ((_without(full, member="M20"), "M20"), (_without(full, symbol="EUA"), "EUA")):
        with pytest.raises(JournalError, match=f"leaves out {name}, which the exchange ran with after its "
                                               "newest snapshot"):
            Ledger.open(config, tmp_path, durability="none")
    with Ledger.open(full, tmp_path, durability="none") as ledger:  # nothing lost, nothing changed
        assert ledger.engine.balances("M20").cash["CNY"].total == 10**6
        assert [o.cl_ord_id for o in ledger.engine.live_orders("M01")] == ["e"]


def test_a_journal_without_names_in_restarted_is_refused_with_the_name_not_a_bare_key_error(tmp_path):
    from engine.journal import JournalError

    full = demo_config()
    small = _without(full, member="M20")
    with Ledger.open(small, tmp_path, today=DAY, durability="none"):
        pass
    kept = list_snapshots(tmp_path)
    with Ledger.open(full, tmp_path, durability="none") as ledger:
        ledger.execute(Restarted(), "", 1)  # written before Restarted named anything
        ledger.execute(NewOrder("a", "CEA25", "buy", 1, 9000), "M20", 2)
    _crash_after(tmp_path, kept)
    with pytest.raises(JournalError, match="a journaled command names 'M20', which the configuration leaves out"):
        Ledger.open(small, tmp_path, durability="none")


def test_a_snapshot_restores_under_a_configuration_that_adds_instruments_currencies_and_members(tmp_path):
    """What was added since the snapshot starts empty and works: a deposit of a new instrument
    or currency used to fail with an internal KeyError after a restart from a snapshot."""
    from engine import InstrumentConfig, LeftOutError

    small = demo_config()
    usd = InstrumentConfig("CCA", "USD", 5000)
    full = msgspec.structs.replace(small, instruments=[*small.instruments, usd])
    with Ledger.open(small, tmp_path, today=DAY, durability="none"):
        pass
    with Ledger.open(full, tmp_path, durability="none") as ledger:
        assert ledger.recovered and list_snapshots(tmp_path)
        for ref, asset in (("a", "CCA"), ("b", "USD"), ("c", "CEA25")):
            _, events, _ = ledger.execute(Deposit(ref, "M01", asset, 500), "ops", 1)
            assert type(events[0]).__name__ == "AdminAck", events
        ledger.engine.check()
        state = ledger.engine.snapshot()
    # restoring under a configuration that leaves out what has a history names it
    with pytest.raises(LeftOutError, match=r"leaves out USD \(held by M01\), CCA \(held by M01\)"):
        Engine.restore(small, state)
