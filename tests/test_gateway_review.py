"""Review of the gateway against the protocol: each test shows one bug that was found and fixed."""

from __future__ import annotations

import contextlib
import logging

import msgspec

import engine as E
from gateway._exchange import Exchange

from _fakes import _REPORTS, ManualLedger, decode_frames, enc, make_config

class Sink:
    def __init__(self):
        self.data = b""
        self.closed = False
        self.replays_pending = 0

    def write(self, b):
        if not self.closed:  # like the server's Connection: nothing goes out after close
            self.data += b

    def close(self):
        self.closed = True

    abort = close

    def replay_later(self):
        self.replays_pending += 1

    def frames(self):
        out = decode_frames(self.data)
        self.data = b""
        return out


def make_exchange(**gateway):
    config = make_config(**gateway)
    ledger = ManualLedger(config)
    return Exchange(config, ledger, clock_ns=lambda: 42), ledger


def connect(ex, member, now=0.0, **logon):
    sink = Sink()
    s = ex.connect(sink, now)
    ex.data_received(s, enc({"type": "Logon", "member": member, "token": f"{member}-token", **logon}), now)
    return s, sink


def durable(ex, ledger):
    ledger.durable_seq = ledger.last_seq
    ex.on_durable(ledger.last_seq)


def order(cl, side="buy", price=9000, qty=1, **kw):
    return enc({"type": "NewOrder", "cl_ord_id": cl, "instrument": "CEA25", "side": side, "qty": qty,
                "price": price, **kw})


def test_drain_sends_every_session_all_cancel_on_disconnect_cancels_before_its_goodbye():
    """Two cancel-on-disconnect sessions of one member: on a clean shutdown each must see the
    other's cancels live too (every session gets every report; the goodbye comes after all a
    session is owed). The drain ended them one at a time, so the first said goodbye before the
    second's cancels existed, and a subscriber missed the BookUpdates of later cancels."""
    ex, ledger = make_exchange()
    a, sa = connect(ex, "M01", cancel_on_disconnect=True)
    b, sb = connect(ex, "M01", cancel_on_disconnect=True)
    w, sw = connect(ex, "M02")
    ex.data_received(w, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    ex.data_received(a, order("a1", price=9000), 0.0)
    ex.data_received(b, order("b1", price=9001), 0.0)
    durable(ex, ledger)
    for s in (sa, sb, sw):
        s.frames()
    ex.drain(0.0)
    durable(ex, ledger)
    for sink in (sa, sb):
        got = [(f["type"], f.get("orig_cl_ord_id")) for f in sink.frames()]
        assert sorted(got[:2]) == [("OrderCancelled", "a1"), ("OrderCancelled", "b1")], got
        assert got[2:] == [("LogoutAccepted", None)]
    got = [(f["type"], f.get("price"), f.get("qty")) for f in sw.frames()]
    assert sorted(got[:2]) == [("BookUpdate", 9000, 0), ("BookUpdate", 9001, 0)], got
    assert got[2:] == [("LogoutAccepted", None, None)]



def test_drain_during_a_paced_resume_replay_sends_the_rest_before_the_goodbye():
    """A session still taking its resume replay at shutdown is owed the rest of it (and its
    cancel-on-disconnect cancels, live) before LogoutAccepted; it got a truncated replay."""
    ex, ledger = make_exchange(max_outbound_bytes=4096)   # replay steps of about 1 KB
    a, sa = connect(ex, "M01")
    n = 40
    ex.data_received(a, b"".join(order(f"o{i}") for i in range(n)), 0.0)
    durable(ex, ledger)
    late, sl = connect(ex, "M01", resume_from=0, cancel_on_disconnect=True)
    assert sl.replays_pending == 1 and late.replay_after < n
    ex.data_received(late, order("late-1", price=8400), 0.0)   # resting, cancel-on-disconnect
    durable(ex, ledger)
    ex.drain(0.0)
    durable(ex, ledger)
    while sl.replays_pending:
        sl.replays_pending -= 1
        ex.replay_more(late)
        durable(ex, ledger)
    frames = sl.frames()
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(1, n + 3)), seqs[-5:]              # the replay, its order, its cancel
    assert frames[-2]["type"] == "OrderCancelled" and frames[-2]["reason"] == "disconnect"
    assert frames[-1]["type"] == "LogoutAccepted" and sl.closed


def test_the_client_disconnects_a_server_silent_for_three_heartbeat_intervals():
    """"A peer silent for 3 x heartbeat_s is disconnected" holds for both sides; the client only
    sent heartbeats, so a server that went silent (a partition, a stopped process) left its
    reads waiting forever."""
    import asyncio

    from gateway.client import Client, ConnectionClosed

    async def silent(reader, writer):
        n = int.from_bytes(await reader.readexactly(4), "big")
        logon = msgspec.msgpack.decode(await reader.readexactly(n))
        body = msgspec.msgpack.encode({"type": "LogonAccepted", "member": logon["member"], "role": "member",
                                       "next_seq": 1, "heartbeat_s": 1, "trading_day": "2026-11-24"})
        writer.write(len(body).to_bytes(4, "big") + body)
        try:
            await asyncio.sleep(30)   # then nothing, and the connection stays open
        except asyncio.CancelledError:
            writer.close()

    async def go():
        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = await Client.connect("127.0.0.1", port)
        try:
            await client.logon("M01", "M01-token", heartbeat_s=1)
            t0 = asyncio.get_running_loop().time()
            try:
                await client.next_report(timeout=6)
            except ConnectionClosed:
                return asyncio.get_running_loop().time() - t0
            except asyncio.TimeoutError:
                return None
        finally:
            await client.close()
            server.close()

    waited = asyncio.run(go())
    assert waited is not None and 2.5 < waited < 4.5, waited


@contextlib.contextmanager
def _peer_not_reading(srv):
    """A raw socket logged on as M01 (heartbeat 1 s, cancel-on-disconnect) with one resting
    order and about 300 KB of replies it does not read, both ends' buffers made small."""
    import socket
    import time

    sk = socket.socket()
    try:
        sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sk.connect(("127.0.0.1", srv.port))
        sk.sendall(enc({"type": "Logon", "member": "M01", "token": "M01-token", "heartbeat_s": 1,
                        "cancel_on_disconnect": True}))
        deadline = time.monotonic() + 5
        while not srv.call(lambda: srv.exchange.by_member.get("M01")) and time.monotonic() < deadline:
            time.sleep(0.01)

        def small_send_buffer():
            for s in srv.exchange.sessions:
                s.sink.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        srv.call(small_send_buffer)
        sk.sendall(order("cod-1") + enc({"type": "QueryBalances"}) * 500)
        yield sk
    finally:
        sk.close()


def test_a_peer_that_half_closes_and_stops_reading_is_still_cut_off_by_the_heartbeat_timeout(tmp_path):
    """The peer sends EOF while replies it does not read are still buffered: the transport
    starts closing itself (waiting to flush, forever), the next write marked the connection
    closing, and the heartbeat timeout's abort then did nothing. The session stayed logged on
    and its cancel-on-disconnect order rested until the peer went away for good."""
    import socket
    import time

    from _fakes import ThreadServer

    with ThreadServer(make_config(), tmp_path) as srv:
        with _peer_not_reading(srv) as sk:
            time.sleep(0.2)
            sk.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 6                                    # 3 x heartbeat_s is 3 s
            while time.monotonic() < deadline:
                state = srv.call(lambda: (len(srv.exchange.sessions), srv.exchange.engine.resting("CEA25")))
                if state == (0, (0, 0)):
                    break
                time.sleep(0.1)
            assert state == (0, (0, 0)), state
            assert srv.call(lambda: srv.exchange.stats.disconnects["heartbeat_timeout"]) == 1


def test_a_logged_out_peer_that_half_closed_and_stops_reading_is_cut_off_after_logon_timeout(tmp_path):
    """docs/protocol.md: a closing connection whose peer does not take the rest within
    logon_timeout_s is cut off. When the peer's EOF came before the goodbye was released (its
    Logout's cancels still on their way to the journal), the transport was already closing by
    itself, close() did nothing and no timer was set: the connection and its unread bytes stayed
    for as long as the peer kept its socket open."""
    import socket
    import time

    from _fakes import ThreadServer

    with ThreadServer(make_config(logon_timeout_s=1.0), tmp_path) as srv:
        with _peer_not_reading(srv) as sk:
            time.sleep(0.3)
            sk.sendall(enc({"type": "Logout"}))     # its cancel goes to the journal; EOF comes meanwhile
            sk.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 2.5       # well within the 3 s heartbeat timeout of an active one
            while time.monotonic() < deadline:
                left = srv.call(lambda: len(srv.exchange.sessions))
                if not left:
                    break
                time.sleep(0.1)
            assert left == 0
            assert srv.call(lambda: srv.exchange.engine.resting("CEA25")) == (0, 0)


def test_logon_accepted_never_announces_a_trading_day_whose_end_of_day_is_not_durable():
    """Nothing caused by a command leaves before the command is durable; LogonAccepted read
    the engine's trading day, so a logon while EndOfDay waited for the journal was told the
    next day, which a crash at that moment would take back."""
    ex, ledger = make_exchange()
    ops, so = connect(ex, "ops")
    ex.data_received(ops, enc({"type": "CloseMarket"}), 0.0)
    durable(ex, ledger)
    ex.data_received(ops, enc({"type": "EndOfDay"}), 0.0)        # waits for the journal
    assert ledger.engine.trading_day == "2026-11-25"
    _, s1 = connect(ex, "M01")
    assert [(f["type"], f["trading_day"]) for f in s1.frames()] == [("LogonAccepted", "2026-11-24")]
    durable(ex, ledger)
    assert so.frames()[-1] == {"type": "AdminAck", "request": "EndOfDay", "trading_day": "2026-11-25"}
    _, s2 = connect(ex, "M01")
    assert [(f["type"], f["trading_day"]) for f in s2.frames()] == [("LogonAccepted", "2026-11-25")]


def test_the_sessions_gauge_counts_logged_on_sessions_not_ones_being_closed():
    """kaboni_sessions is "sessions logged on"; a session that logged out (or broke the framing)
    still counted until its peer had taken the last bytes and the socket closed (up to
    logon_timeout_s for a peer that does not read), though the logon limit already let it go."""
    ex, ledger = make_exchange()
    a, sa = connect(ex, "M01")
    b, sb = connect(ex, "M01")
    c, sc = connect(ex, "M02")
    ops, _ = connect(ex, "ops")
    assert ex.session_counts() == {"member": 3, "operator": 1}
    ex.data_received(a, enc({"type": "Logout"}), 0.0)
    ex.data_received(c, b"\x00\x00\x00\x00", 0.0)             # bad_frame: Error, then close
    durable(ex, ledger)
    assert sa.closed and sc.closed                              # the peers have not gone yet
    assert ex.session_counts() == {"member": 1, "operator": 1}
    ex.connection_lost(a, "client_close", 0.0)
    ex.connection_lost(c, "client_close", 0.0)
    assert ex.session_counts() == {"member": 1, "operator": 1}


def test_a_resubscribe_after_unsubscribe_starts_with_its_snapshot_not_stale_increments():
    """"Subscribe gives a snapshot and then incremental updates." Market data still waiting for
    the journal when a session unsubscribed went out to it anyway once it had subscribed again,
    ahead of the new snapshot and after a gap (the events released in between were withheld)."""
    ex, ledger = make_exchange()
    a, sa = connect(ex, "M01")
    w, sw = connect(ex, "M02")
    ex.data_received(w, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    durable(ex, ledger)
    k = sw.frames()[-1]["md_seq"]
    ex.data_received(a, order("o1", price=9000), 0.0)           # md_seq k + 1, waits for the journal
    first = ledger.last_seq
    ex.data_received(a, order("o2", price=9001), 0.0)           # md_seq k + 2, waits too
    ex.data_received(w, enc({"type": "Unsubscribe", "instruments": ["CEA25"]}), 0.0)
    ledger.durable_seq = first
    ex.on_durable(first)                                        # k + 1 released: w is not subscribed
    ex.data_received(w, enc({"type": "Subscribe", "instruments": ["CEA25"]}), 0.0)
    durable(ex, ledger)
    got = [(f["type"], f["md_seq"]) for f in sw.frames()]
    assert got == [("BookSnapshot", k + 2)], got
    ex.data_received(a, order("o3", price=9002), 0.0)
    durable(ex, ledger)
    assert [(f["type"], f["md_seq"]) for f in sw.frames()] == [("BookUpdate", k + 3)]


class CheckingSink(Sink):
    """A sink that decodes what it is given and checks, at the moment of writing, that every
    report's journal entry is durable."""

    def __init__(self, ledger):
        super().__init__()
        self.ledger = ledger
        self.got = []

    def write(self, b):
        if self.closed:
            return
        while b:
            n = int.from_bytes(b[:4], "big")
            m = msgspec.msgpack.decode(b[4:4 + n])
            b = b[4 + n:]
            if "seq" in m:
                assert self.ledger.entry_of[(m["member"], m["seq"])] <= self.ledger.durable_seq, m
            self.got.append(m)


class EntryLedger(ManualLedger):
    """ManualLedger that remembers the journal entry of every report."""

    def __init__(self, config):
        self.entry_of = {}
        super().__init__(config)

    def execute(self, cmd, member, ts, session=0, throttled=False):
        seq, events, reports = super().execute(cmd, member, ts, session, throttled)
        for e in events:
            if isinstance(e, _REPORTS):
                self.entry_of[(e.member, e.seq)] = seq
        return seq, events, reports


def _random_day(seed, drain=False):
    import random

    from gateway._session import State

    rnd = random.Random(seed)
    config = make_config(max_outbound_bytes=2048)          # replay steps of a few reports
    ledger = EntryLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    ops = ex.connect(Sink(), 0.0)
    ex.data_received(ops, enc({"type": "Logon", "member": "ops", "token": "ops-token"}), 0.0)
    sessions = []   # (session, sink, member, resume_from)
    for n in range(250):
        r = rnd.random()
        live = [x for x in sessions if x[0].state is not State.CLOSED]
        if r < 0.12 or not live:
            m = rnd.choice(["M01", "M02"])
            sink = CheckingSink(ledger)
            s = ex.connect(sink, 0.0)
            logon = {"type": "Logon", "member": m, "token": f"{m}-token", "cancel_on_disconnect": rnd.random() < 0.5}
            if rnd.random() < 0.6:
                logon["resume_from"] = rnd.randint(0, ex.released.get(m, 0))
            ex.data_received(s, enc(logon), 0.0)
            sessions.append((s, sink, m, logon.get("resume_from")))
        elif r < 0.55:
            s, sink, m, _ = rnd.choice(live)
            msgs = [{"type": "NewOrder", "cl_ord_id": f"o{n}", "instrument": "CEA25", "side": rnd.choice(["buy", "sell"]),
                     "qty": rnd.randint(1, 5), "price": rnd.choice([9200, 9250, 9300])}]
            if rnd.random() < 0.2:
                msgs.append({"type": "MassCancel", "cl_ord_id": f"mc{n}"})
            if rnd.random() < 0.2:
                msgs.append({"type": "Subscribe", "instruments": ["CEA25"]})
            if rnd.random() < 0.08:
                msgs.append({"type": "Unsubscribe", "instruments": ["CEA25"]})
                if s.state is State.ACTIVE and "CEA25" in s.subscriptions:
                    sink.got.append({"type": "(unsubscribed)"})
            ex.data_received(s, b"".join(enc(x) for x in msgs), 0.0)
        elif r < 0.75:
            ledger.durable_seq = rnd.randint(ledger.durable_seq, ledger.last_seq)
            ex.on_durable(ledger.durable_seq)
        elif r < 0.85:
            for s, sink, _, _ in live:
                while sink.replays_pending and rnd.random() < 0.7:
                    sink.replays_pending -= 1
                    ex.replay_more(s)
        elif r < 0.87:
            ex.data_received(ops, enc(rnd.choice([{"type": "Halt", "instrument": "CEA25"},
                                                  {"type": "Resume", "instrument": "CEA25"}])), 0.0)
        elif r < 0.9:
            ex.data_received(rnd.choice(live)[0], enc({"type": "Logout"}), 0.0)
        else:
            ex.connection_lost(rnd.choice(live)[0], "client_close", 0.0)
    active_at_drain = set()
    if drain:
        active_at_drain = {s for s, _, _, _ in sessions if s.state is State.ACTIVE}
        ex.drain(0.0)
    for _ in range(100):
        durable(ex, ledger)
        for s, sink, _, _ in sessions:
            while sink.replays_pending:
                sink.replays_pending -= 1
                ex.replay_more(s)
    return ex, ledger, sessions, active_at_drain


def test_random_interleavings_keep_reports_durable_gap_free_once_and_market_data_consistent():
    """Logons with and without resume_from, paced replays, orders, (un)subscribes, halts,
    logouts, disconnects and durability advancing in uneven steps, in random order, and for
    half the runs a drain at the end (each session then owed all and LogoutAccepted last): every
    session sees its member's reports once, in order, with no gap from where it started, none
    before it is durable; and market data only after a snapshot, md_seq without gaps."""
    from gateway._session import State

    for seed in range(200):
        ex, ledger, sessions, active_at_drain = _random_day(seed, drain=seed % 2 == 1)
        for s, sink, m, resume in sessions:
            got = sink.got
            if not got or got[0]["type"] != "LogonAccepted":
                continue
            start = resume + 1 if resume is not None else got[0]["next_seq"]
            seqs = [f["seq"] for f in got if "seq" in f]
            assert seqs == list(range(start, start + len(seqs))), (seed, s.sid, resume, seqs[:10])
            assert all(f["member"] == m for f in got if "seq" in f)
            if s.state is State.ACTIVE or s in active_at_drain:   # logged on to the end: it has everything
                assert start + len(seqs) == ledger.engine.last_seq(m) + 1, (seed, s.sid)
            if s in active_at_drain:                               # then the goodbye, last
                assert got[-1]["type"] == "LogoutAccepted" and sink.closed, (seed, s.sid, got[-1])
            md = None
            for f in got:
                if f["type"] == "BookSnapshot":
                    md = f["md_seq"]
                elif f["type"] == "(unsubscribed)":
                    md = None
                elif f["type"] in ("BookUpdate", "Trade", "InstrumentStatus"):
                    assert md is not None and f["md_seq"] == md + 1, (seed, s.sid, f, md)
                    md = f["md_seq"]


def test_drain_cancels_for_a_session_already_closing_before_the_goodbyes():
    """A cancel-on-disconnect session that broke the framing just before the shutdown is still
    closing (its Error waits for the journal); its orders were cancelled only when its socket
    closed, after the member's other sessions had had their goodbye, so they never saw it."""
    ex, ledger = make_exchange()
    a, sa = connect(ex, "M01", cancel_on_disconnect=True)
    b, sb = connect(ex, "M01")
    ex.data_received(a, order("a1"), 0.0)
    durable(ex, ledger)
    ex.data_received(b, order("b1", price=9001), 0.0)          # waits for the journal
    ex.data_received(a, b"\x00\x00\x00\x00", 0.0)              # bad_frame: a is closing
    sb.frames()
    ex.drain(0.0)
    durable(ex, ledger)
    ex.connection_lost(a, "client_close", 0.0)
    durable(ex, ledger)
    got = [(f["type"], f.get("reason"), f.get("cl_ord_id")) for f in sb.frames()]
    assert got == [("OrderAccepted", None, "b1"), ("OrderCancelled", "disconnect", "a1"),
                   ("LogoutAccepted", None, None)], got


def test_logout_during_a_paced_resume_replay_sends_the_rest_before_the_goodbye():
    """A Logout while the resume replay is still going: the session is owed the rest of it, the
    live reports waiting behind it and its own cancels, then LogoutAccepted (found by the
    black-box audit: the close came first, cutting the replay and the session's own reports)."""
    ex, ledger = make_exchange(max_outbound_bytes=4096)   # replay steps of about 1 KB
    a, sa = connect(ex, "M01")
    n = 40
    ex.data_received(a, b"".join(order(f"o{i}") for i in range(n)), 0.0)
    durable(ex, ledger)
    late, sl = connect(ex, "M01", resume_from=0, cancel_on_disconnect=True)
    assert sl.replays_pending == 1 and late.replay_after < n
    ex.data_received(late, order("late-1", price=8400) + enc({"type": "Logout"}), 0.0)
    durable(ex, ledger)
    while sl.replays_pending:
        sl.replays_pending -= 1
        ex.replay_more(late)
        durable(ex, ledger)
    frames = sl.frames()
    seqs = [f["seq"] for f in frames if "seq" in f]
    assert seqs == list(range(1, n + 3)), seqs[-5:]              # the replay, its order, its cancel
    assert frames[-3]["type"] == "OrderAccepted" and frames[-3]["cl_ord_id"] == "late-1"
    assert frames[-2]["type"] == "OrderCancelled" and frames[-2]["reason"] == "disconnect"
    assert frames[-1]["type"] == "LogoutAccepted" and sl.closed


def test_a_reply_during_a_resume_replay_does_not_overtake_the_report_of_an_earlier_request():
    """Live reports wait behind a resume replay; a Balances or Error reply must wait with them
    (docs/protocol.md: a reply never overtakes the report of an earlier request). A BookSnapshot
    is market data and does not wait."""
    ex, ledger = make_exchange(max_outbound_bytes=4096)
    a, _ = connect(ex, "M01")
    n = 40
    ex.data_received(a, b"".join(order(f"o{i}") for i in range(n)), 0.0)
    durable(ex, ledger)
    late, sl = connect(ex, "M01", resume_from=0)
    assert sl.replays_pending == 1
    ex.data_received(late, order("late-1", price=8400) + enc({"type": "QueryBalances"})
                     + enc({"type": "NoSuchMessage"}), 0.0)
    durable(ex, ledger)
    while sl.replays_pending:
        sl.replays_pending -= 1
        ex.replay_more(late)
        durable(ex, ledger)
    frames = sl.frames()
    types = [f["type"] for f in frames]
    accepted = next(i for i, f in enumerate(frames) if f.get("cl_ord_id") == "late-1")
    assert types[accepted:] == ["OrderAccepted", "Balances", "Error"], types[n - 2:]
    assert [f["seq"] for f in frames if "seq" in f] == list(range(1, n + 2))


def test_replies_held_behind_a_replay_are_bounded_like_the_outbound_buffer():
    """A resuming peer that reads nothing and sends QueryBalances after QueryBalances: the
    replies wait behind its replay, outside the transport's buffer, so they count toward
    max_outbound_bytes too; past it the peer is a slow consumer."""
    ex, ledger = make_exchange(max_outbound_bytes=4096)
    a, _ = connect(ex, "M01")
    ex.data_received(a, b"".join(order(f"o{i}") for i in range(40)), 0.0)
    durable(ex, ledger)
    late, sl = connect(ex, "M01", resume_from=0)
    assert sl.replays_pending == 1 and late.replay_after is not None
    for _ in range(100):  # a Balances is about 300 bytes: past the 4 KiB bound within 15
        ex.data_received(late, enc({"type": "QueryBalances"}), 0.0)
        if sl.closed:
            break
    assert sl.closed and late.cause == "slow_consumer"
    assert late.held_bytes < 2 * 4096  # the bound and the one reply that crossed it


def test_a_member_trying_operator_messages_is_logged_without_flooding_the_log(caplog):
    ex, ledger = make_exchange()
    s, sink = connect(ex, "M01")
    caplog.set_level(logging.INFO, logger="kaboni")
    for _ in range(120):
        ex.data_received(s, enc({"type": "Halt", "instrument": "CEA25"}), 1.0)
    durable(ex, ledger)
    errors = [f for f in sink.frames() if f["type"] == "Error"]
    assert len(errors) == 120 and {e["reason"] for e in errors} == {"not_authorized"}
    lines = [r.getMessage() for r in caplog.records if "event=not_authorized" in r.getMessage()]
    assert len(lines) == 3  # the 1st, 10th and 100th
    assert lines[0].endswith("member=M01 role=member session=1 request=Halt refused=1")
    assert [r.levelno for r in caplog.records if "event=not_authorized" in r.getMessage()] == [logging.WARNING] * 3
    assert ex.engine.status("CEA25") == "open"


def test_the_role_decides_before_the_fields_a_malformed_message_of_another_role_is_not_authorized():
    """A member's Halt without its instrument is not invalid_message: it is not the member's to
    send at all (and an operator's malformed NewOrder likewise)."""
    ex, ledger = make_exchange()
    m, msink = connect(ex, "M01")
    o, osink = connect(ex, "ops")
    ex.data_received(m, enc({"type": "Halt"}), 1.0)
    ex.data_received(m, enc({"type": "Deposit", "ref": 1}), 1.0)
    ex.data_received(m, enc({"type": "NewOrder", "cl_ord_id": "x"}), 1.0)  # its own: invalid_message
    ex.data_received(o, enc({"type": "NewOrder"}), 1.0)
    ex.data_received(o, enc({"type": "QueryBalances", "extra": 1}), 1.0)
    ex.data_received(o, enc({"type": "Halt"}), 1.0)  # its own: invalid_message
    durable(ex, ledger)
    got = [(f["reason"], f["text"]) for f in msink.frames() if f["type"] == "Error"]
    assert got == [("not_authorized", "Halt is for operators only"),
                   ("not_authorized", "Deposit is for operators only"),
                   ("invalid_message", got[2][1])]
    got = [(f["reason"], f["text"]) for f in osink.frames() if f["type"] == "Error"]
    assert got == [("not_authorized", "operators cannot enter orders"),
                   ("not_authorized", "operators have no accounts"),
                   ("invalid_message", "instrument: missing required field")]


def test_every_frame_the_server_sends_fits_in_max_frame():
    """The length limit holds in both directions: a snapshot of a wide book keeps the best
    levels that fit; texts quoting what a client sent are cut short."""
    import msgspec as _m

    config = make_config(max_frame=4096)
    wide = E.InstrumentConfig("WIDE", "CNY", 10_000, band_bp=9_000)  # 1,000 .. 19,000: 18,001 prices
    config = _m.structs.replace(config, instruments=[*config.instruments, wide])
    ledger = ManualLedger(config)
    ex = Exchange(config, ledger, clock_ns=lambda: 42)
    ledger.execute(E.Deposit("w", "M02", "WIDE", 10**6), "", 0)
    for i in range(1_000):
        ledger.execute(E.NewOrder(f"b{i}", "WIDE", "buy", 1, 9_000 - i), "M01", 0)
        ledger.execute(E.NewOrder(f"s{i}", "WIDE", "sell", 1, 11_000 + i), "M02", 0)
    ledger.durable_seq = ledger.last_seq
    s, sink = connect(ex, "M01")
    ex.data_received(s, enc({"type": "Subscribe", "instruments": ["WIDE"], "depth": 100_000}), 1.0)
    ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "x", "instrument": "Y" * 3_000, "side": "buy",
                             "qty": 1, "price": 9000}), 1.0)
    ex.data_received(s, enc({"type": "T" * 3_900}), 1.0)
    ex.data_received(s, enc({"type": "NewOrder", "cl_ord_id": "y", "instrument": "CEA25", "side": "u" * 3_800,
                             "qty": 1, "price": 9000}), 1.0)
    durable(ex, ledger)
    data, frames = sink.data, []
    while data:
        n = int.from_bytes(data[:4], "big")
        assert 1 <= n <= 4096
        frames.append(msgspec.msgpack.decode(data[4:4 + n]))
        data = data[4 + n:]
    snap = next(f for f in frames if f["type"] == "BookSnapshot")
    depth = len(snap["bids"])
    assert 50 < depth < 1_000 and len(snap["asks"]) == depth  # as many as fit, the best first
    assert [b[0] for b in snap["bids"]] == [9_000 - i for i in range(depth)]
    assert [a[0] for a in snap["asks"]] == [11_000 + i for i in range(depth)]
    rejected = next(f for f in frames if f["type"] == "OrderRejected")
    assert rejected["reason"] == "unknown_instrument" and rejected["text"] == "no instrument " + repr("Y" * 40) + "..."
    errors = [f for f in frames if f["type"] == "Error"]
    assert [e["reason"] for e in errors] == ["invalid_message", "invalid_message"]
    assert all(len(e["text"]) == 203 for e in errors)


def test_a_replay_that_meets_a_damaged_journal_closes_the_session_and_says_why(caplog):
    """A flipped byte in an older segment is found only when a replay reads it: that was an
    internal_error with a traceback on every reconnect; now one ERROR line and a closed session."""
    from engine.journal import CorruptJournalError

    ex, ledger = make_exchange()
    s, sink = connect(ex, "M01")
    ex.data_received(s, order("a"), 0.0)
    durable(ex, ledger)
    assert [f["type"] for f in sink.frames()] == ["LogonAccepted", "OrderAccepted"]

    def damaged(*args, **kwargs):
        raise CorruptJournalError("/data/journal-00000000000000000001.kbj", 4096, "checksum mismatch")
    ledger.report_step = damaged
    with caplog.at_level(logging.ERROR, logger="kaboni"):
        again, sink2 = connect(ex, "M01", resume_from=0)
    assert sink2.closed and again.cause == "replay_failed"
    line = next(r.getMessage() for r in caplog.records if "event=replay_failed" in r.getMessage())
    assert "member=M01" in line and "checksum mismatch" in line and "Traceback" not in caplog.text
    assert not s.sink.closed  # the member's other session goes on
